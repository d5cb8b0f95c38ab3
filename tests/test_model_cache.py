"""The SmolLM2 cache: jobs of a sweep that start together must all end up loading one complete folder.

Found on a fresh machine (2026-12-02): two sweep jobs both converted the GGUF; the second to finish removed
the folder the first had renamed into place while the first was loading it, and the first job failed with
"Couldn't instantiate the backend tokenizer". The conversion is replaced by a fake here (the real one takes
~20 s and 540 MB) that sleeps so the two callers overlap for certain.
"""

import threading
import time

from opr import backbones


def fake_dequantise(calls):
    def write(gguf, out):
        calls.append(out.name)
        time.sleep(0.5)  # both callers are inside the slow part at once unless one waits for the other
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / ".complete").write_text("fake\n")

    return write


def test_concurrent_first_runs_convert_once_and_both_get_the_folder(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(backbones, "_dequantise_smollm2", fake_dequantise(calls))
    monkeypatch.setattr(backbones, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    results, errors = [], []

    def first_run():
        try:
            results.append(backbones.cache_smollm2(tmp_path / "cache"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=first_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1, f"the GGUF was converted {len(calls)} times"
    assert results == [tmp_path / "cache" / "smollm2_135m"] * 2
    assert (results[0] / ".complete").exists()


def test_a_complete_cache_is_used_as_it_is(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(backbones, "_dequantise_smollm2", fake_dequantise(calls))
    monkeypatch.setattr(backbones, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    target = backbones.cache_smollm2(tmp_path)
    marker = target / "config.json"
    stamp = marker.stat().st_mtime_ns
    assert backbones.cache_smollm2(tmp_path) == target
    assert len(calls) == 1 and marker.stat().st_mtime_ns == stamp


def test_a_half_written_cache_from_a_crash_is_replaced(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(backbones, "_dequantise_smollm2", fake_dequantise(calls))
    monkeypatch.setattr(backbones, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    half = tmp_path / "smollm2_135m"
    half.mkdir()
    (half / "config.json").write_text("{}")  # no .complete marker
    assert backbones.cache_smollm2(tmp_path) == half
    assert len(calls) == 1 and (half / ".complete").exists()
