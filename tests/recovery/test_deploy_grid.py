"""A model recovered through its --wbits 8 grid deploys on sparse-cpu with every matrix read back exactly
from the recorded scales, and computes what the fake-quantized torch model does."""

import numpy as np

from sparse_export.recovery.jobs import recover
from tests.recovery.conftest import pruned_copy


def test_sparse_cpu_reads_the_recovered_grid(tiny_dirs, tmp_path, text_file):
    from sparse_export.runtimes.sparse_cpu.session import DecodeSession

    pruned = pruned_copy(tiny_dirs["llama"], tmp_path / "pruned", text_file, method="sparsegpt", wbits=8)
    out = tmp_path / "rec"
    recover(pruned, out, tiny_dirs["llama"], str(text_file), steps=4, lr=1e-2, log=lambda *a: None, threads=1,
            seqlen=32, max_segments=1)
    sparse = DecodeSession(out, "sparse-cpu", threads=1)
    decoder = [n for n in sparse.summary["layers"] if n != "lm_head"]
    assert decoder and set(sparse.summary["exact_grid"]) == set(decoder)
    prompt = list(range(5, 30))
    got = sparse.run([prompt], 0)[0]
    ref = DecodeSession(out, "fake-quant", threads=1).run([prompt], 0)[0]
    assert np.array_equal(got, ref)
    before = DecodeSession(pruned, "fake-quant", threads=1).run([prompt], 0)[0]
    assert not np.array_equal(before, ref)          # the deployed model is the recovered one
