"""Pieces of the benchmark scripts that decide what they report (the timings themselves are not tested)."""

from __future__ import annotations

import torch

from opr.tools.bench.sft_throughput import op_class, profiled


def test_operator_classes():
    assert op_class("aten::mm") == op_class("aten::addmm") == "matmul"
    assert op_class("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_class("aten::_log_softmax") == "softmax / cross-entropy"
    assert op_class("aten::_foreach_addcdiv_") == "optimizer"
    assert op_class("aten::embedding_dense_backward") == "embedding"
    assert op_class("aten::mul") == "other (elementwise, copies, ...)"


def test_profile_attributes_time_to_classes():
    a = torch.randn(256, 256)

    def work():
        for _ in range(20):
            b = a @ a
        return float(torch.log_softmax(b, -1).sum())

    value, prof = profiled(work)
    assert isinstance(value, float)
    classes = prof["classes"]
    assert abs(sum(c["share"] for c in classes.values()) - 1.0) < 1e-9
    assert classes["matmul"]["share"] > 0.5  # 20 matmuls of 256^3 dominate one softmax
    assert prof["top_ops"][0]["op"] == "aten::mm" and prof["top_ops"][0]["calls"] == 20


def test_attention_bench_times_every_path_and_agrees_with_the_loop():
    from opr.tools.bench import attention

    res = attention.main(["--device", "cpu", "--dtype", "float32", "--sequences", "3", "--shortest", "2",
                          "--longest", "9", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--repeats", "1",
                          "--warmup", "0"])
    assert res["selected"] == "per_sequence_loop"  # the CPU path
    assert set(res["results"]) == {"per_sequence_loop", "padded_batch", "sdpa_block_mask"}
    assert all(r["max_abs_diff_vs_loop"] < 1e-5 and r["ms"] > 0 for r in res["results"].values())
    assert set(res["ratios"]) == {"per_sequence_loop/sdpa_block_mask"}
