"""``adapter-gateway train`` on a tiny model folder: progress on stderr, a JSON summary on stdout,
a PEFT folder that validates, and the dataset problems by line number."""

from __future__ import annotations

import json

import pytest
from support import build_tiny_llama, build_tokenizer

from gateway.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer()
    build_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(model_dir, tmp_path, data: bytes, *extra: str) -> None:
    (tmp_path / "data.jsonl").write_bytes(data)
    main(["train", "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out"), "--model", str(model_dir),
          "--quantization", "none", "--device", "cpu", "--data-dir", str(tmp_path / "state"), "--log-level", "warning",
          *extra])


def test_train_writes_a_peft_adapter_and_a_summary(model_dir, tmp_path, capsys):
    rows = [{"instruction": f"say hi {i}", "input": "", "output": "hello world"} for i in range(6)]
    run_cli(model_dir, tmp_path, "\n".join(map(json.dumps, rows)).encode(), "--kind", "ia3", "--max-steps", "2",
            "--batch-size", "2", "--target-modules", "k_proj,v_proj,down_proj")
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["kind"] == "ia3" and summary["steps"] == 2 and summary["train_examples"] == 5
    assert "step 2/2" in out.err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / ".checkpoints").exists()


def test_bad_dataset_and_config_exit_with_the_reason(model_dir, tmp_path):
    bad = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\nnot json\n'
    with pytest.raises(SystemExit) as exit_info:
        run_cli(model_dir, tmp_path, bad)
    message = str(exit_info.value.code)
    assert "line 2: missing field 'completion'" in message and "line 3: not valid JSON" in message
    with pytest.raises(SystemExit) as exit_info:
        run_cli(model_dir, tmp_path, b'{"prompt": "a", "completion": "b"}', "--lr-schedule", "sometimes")
    assert "lr_schedule" in str(exit_info.value.code)
