"""`pretrain bench infer` on a tiny random-weight checkpoint: every requested variant gets a row with
speed, cosine to eager and zero-shot, the fused-export variant included (values are not timed here: the
numbers live in docs/benchmarks.md)."""

from __future__ import annotations

from tiny import write_tiny_weights

from pretrain.bench.infer import run_infer_bench


def test_bench_infer_rows_for_default_and_fused_exports(tiny_tok, shards, tmp_path):
    weights = write_tiny_weights(tmp_path / "weights", tiny_tok)
    variants = ["torch:fp32", "onnx:fp32", "onnx:int8", "onnx:int8-fused"]
    res = run_infer_bench(tmp_path / "out", str(weights), shards["val"], shards["classnames"], variants,
                          batch=4, iters=1, latency_iters=1, max_samples=32, calib_samples=8, overrides=[])
    assert list(res["variants"]) == variants
    for name, row in res["variants"].items():
        assert "skipped" not in row, (name, row)
        assert {"images_per_s", "texts_per_s", "images_per_s_vs_eager", "zeroshot_top1",
                "image_cosine_min", "text_cosine_min"} <= set(row), name
    assert res["variants"]["onnx:fp32"]["image_cosine_min"] >= 0.9999
    assert res["variants"]["onnx:fp32"]["text_cosine_min"] >= 0.9999
    assert res["variants"]["onnx:int8-fused"]["image_cosine_min"] > 0.98
    assert (tmp_path / "out" / "onnx-int8-fused" / "manifest.json").is_file()
