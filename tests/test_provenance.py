"""The machine facts a run records (``opr.provenance``)."""

from opr.provenance import REPRODUCTION_KEYS, cpu_features, reproduction_facts

ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 sha_ni\n"
AVX2_ONLY = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
AMX = "model name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


def test_cpu_features_tell_apart_the_machines_one_model_name_hides():
    assert cpu_features(ZEN4) == "avx2 avx512f avx512_bf16"
    assert cpu_features(AVX2_ONLY) == "avx2"
    assert cpu_features(AMX) == "avx2 avx512f avx512_bf16 amx_bf16"
    assert cpu_features("model name\t: some CPU\n") == ""  # no flags line (not Linux x86): unknown


def test_a_run_records_the_cpu_features():
    facts = reproduction_facts()
    assert isinstance(facts["cpu_features"], str) and facts["cpu_features"] == cpu_features()
    assert tuple(facts) == REPRODUCTION_KEYS  # what a resumed attempt records (opr.loop) is every fact
