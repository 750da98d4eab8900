// Negative log-likelihood of given token ids under a GGUF model, through llama.cpp's own logits.
// Written for benchmarks/bench_frontier.py: every engine is scored on the same WikiText-2 windows
// (tokenized once with the Hugging Face tokenizer), every token of a window after the first.
//
//   llama_logits MODEL.gguf WINDOWS.txt THREADS
//   WINDOWS.txt: one window per line, token ids separated by spaces.
//   stdout: one JSON line per window {"window": i, "nll": sum, "tokens": n}, then {"total_nll", "tokens"}.
//
// Build (bench_frontier.py does it):
//   g++ -O2 -std=c++17 llama_logits.cpp -I LLAMA/include -I LLAMA/ggml/include -L BIN -lllama -Wl,-rpath,BIN
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf WINDOWS.txt THREADS\n", argv[0]);
        return 2;
    }
    std::vector<std::vector<llama_token>> windows;
    std::ifstream in(argv[2]);
    for (std::string line; std::getline(in, line);) {
        std::istringstream ss(line);
        std::vector<llama_token> w;
        for (long id; ss >> id;) w.push_back((llama_token) id);
        if (!w.empty()) windows.push_back(w);
    }
    if (windows.empty()) {
        fprintf(stderr, "no token windows in %s\n", argv[2]);
        return 2;
    }
    size_t longest = 0;
    for (auto & w : windows) longest = w.size() > longest ? w.size() : longest;

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.use_extra_bufts = false;   // no repacked or AMX buffers: this build's AMX path crashes on multi-token batches here
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) longest;
    cp.n_batch = (uint32_t) longest;     // one llama_decode per window, every position's logits
    cp.n_ubatch = 512;
    cp.n_threads = cp.n_threads_batch = atoi(argv[3]);
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context of %zu tokens\n", longest);
        return 1;
    }
    double total = 0;
    long count = 0;
    for (size_t wi = 0; wi < windows.size(); ++wi) {
        const auto & w = windows[wi];
        for (llama_token t : w) {
            if (t < 0 || t >= n_vocab) {
                fprintf(stderr, "token id %d is outside the model's vocabulary of %d\n", t, n_vocab);
                return 1;
            }
        }
        llama_memory_clear(llama_get_memory(ctx), true);   // each window starts from an empty cache
        llama_batch batch = llama_batch_init((int32_t) w.size(), 0, 1);
        for (size_t i = 0; i < w.size(); ++i) {
            batch.token[i] = w[i];
            batch.pos[i] = (llama_pos) i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        batch.n_tokens = (int32_t) w.size();
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed on window %zu\n", wi);
            return 1;
        }
        double nll = 0;
        for (size_t i = 0; i + 1 < w.size(); ++i) {     // position i predicts token i + 1
            const float * lg = llama_get_logits_ith(ctx, (int32_t) i);
            double mx = lg[0];
            for (int v = 1; v < n_vocab; ++v) mx = lg[v] > mx ? lg[v] : mx;
            double sum = 0;
            for (int v = 0; v < n_vocab; ++v) sum += std::exp((double) lg[v] - mx);
            nll += mx + std::log(sum) - (double) lg[w[i + 1]];
        }
        llama_batch_free(batch);
        printf("{\"window\": %zu, \"nll\": %.9f, \"tokens\": %zu}\n", wi, nll, w.size() - 1);
        fflush(stdout);
        total += nll;
        count += (long) w.size() - 1;
    }
    printf("{\"total_nll\": %.9f, \"tokens\": %ld}\n", total, count);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
