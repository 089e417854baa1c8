"""Plugins (app/plugins.py): user code that registers a target reaches every command, from a file, a module on
sys.path or an installed entry point; loading twice is a no-op; a plugin that cannot load is named with the fix."""

import ast
import contextlib
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig

from eagle_trainer import registry
from eagle_trainer.app import plugins
from eagle_trainer.app.data import main as data_main
from eagle_trainer.app.demo import synthetic_prompts
from eagle_trainer.app.evaluate import main as eval_main
from eagle_trainer.app.export import main as export_main
from eagle_trainer.app.train import RECIPES, run, to_config
from eagle_trainer.data.chat import read_chat_jsonl, write_chat_jsonl
from eagle_trainer.targets.tiny import save_tiny_checkpoint

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama_target.py"
LLAMA = "LlamaForCausalLM"
UNKNOWN_LLAMA = f"unknown target architecture '{LLAMA}'"
TEST_MODULES = "plugin_test_"  # modules the tests write start with this (removed from sys.modules after each test)


@contextlib.contextmanager
def fresh_registry():
    """The built-in registry entries only, and no plugin module imported; restored after."""
    registry.known_targets()  # the built-ins registered
    saved = registry._TARGETS, registry._ALGORITHMS, plugins._called
    # tests/test_registry.py registers LlamaForCausalLM in this process; here it must come from a plugin
    registry._TARGETS = {k: v for k, v in saved[0].items() if k != LLAMA}
    registry._ALGORITHMS, plugins._called = dict(saved[1]), set()
    modules = set(sys.modules)
    try:
        yield
    finally:
        registry._TARGETS, registry._ALGORITHMS, plugins._called = saved
        for name in set(sys.modules) - modules:
            if name.startswith((plugins.FILE_MODULE_PREFIX, TEST_MODULES)):
                del sys.modules[name]


@pytest.fixture(autouse=True)
def clean_registry():
    with fresh_registry():
        yield


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random LlamaForCausalLM checkpoint (5 layers, hidden 32, vocab 512) with its tokenizer, and chat data."""
    root = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    target = save_tiny_checkpoint(root / "target", config, logit_std=6.0)
    assert json.loads((target / "config.json").read_text())["architectures"] == [LLAMA]
    prompts = synthetic_prompts(12, seed=1)
    write_chat_jsonl(root / "prompts.jsonl", prompts[:2])
    write_chat_jsonl(root / "chat.jsonl", [conv + [{"role": "assistant", "content": f"Kalo mine su {i % 5} ta."}]
                                           for i, conv in enumerate(prompts)])
    return root


def train_overrides(root: Path, run_dir: Path) -> list[str]:
    return ["demo.enabled=false", f"target.path={root / 'target'}", f"data.path={root / 'chat.jsonl'}",
            f"data.cache_dir={root / 'cache'}", "data.max_length=64", "draft.draft_vocab_size=64",
            "draft.ttt_steps=2", "optim.batch_size=2", "optim.warmup_steps=0", "train.max_steps=2",
            f"train.run_dir={run_dir}", "train.save_every=0", "train.eval_batches=0", "train.progress=false",
            "train.device=cpu", "accept.enabled=false"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


@pytest.fixture(scope="module")
def llama_run(llama, tmp_path_factory):
    """`eagle-train plugins=[examples/llama_target.py] ...`: two steps on the tiny Llama -> (run_dir, Summary)."""
    run_dir = tmp_path_factory.mktemp("llama_run")
    cfg = compose_train([f"plugins=[{EXAMPLE}]", *train_overrides(llama, run_dir)])
    assert cfg.plugins == [str(EXAMPLE)]
    with fresh_registry():
        return run_dir, run(cfg)


def test_train_takes_the_target_of_a_recipe_plugin(llama, llama_run, tmp_path):
    run_dir, summary = llama_run
    assert summary.steps == 2 and (run_dir / "export/sglang/config.json").is_file()
    with pytest.raises(ValueError, match=UNKNOWN_LLAMA + ".*--plugin"):  # the same run without the plugin
        run(compose_train(train_overrides(llama, tmp_path / "run")))


def test_eval_and_export_of_a_plugin_run_take_the_plugin(llama, llama_run, tmp_path):
    """The run's checkpoint names its target's architecture but imports no code: eagle-eval needs --plugin."""
    run_dir, _ = llama_run
    args = ["--target", str(llama / "target"), "--draft", str(run_dir), "--data", str(llama / "chat.jsonl"),
            "--out", str(tmp_path / "eval.json"), "--mode", "chain", "--steps", "2", "--num-prompts", "2",
            "--max-new-tokens", "6", "--ttt-steps", "2", "--device", "cpu", "--no-progress"]
    with pytest.raises(KeyError, match=UNKNOWN_LLAMA):
        eval_main(args)
    assert eval_main([*args, "--plugin", str(EXAMPLE)]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["modes"]["chain"]["num_prompts"] == 2
    assert export_main(["--checkpoint", str(run_dir), "--format", "sglang", "--out", str(tmp_path / "export"),
                        "--plugin", str(EXAMPLE)]) == 0
    # exporting reads the draft alone: a target plugin is not needed there
    assert export_main(["--checkpoint", str(run_dir), "--format", "sglang", "--out", str(tmp_path / "e2")]) == 0


def test_data_commands_take_the_target_of_a_plugin(llama, tmp_path, monkeypatch, capsys):
    regenerate = ["regenerate", "--target", str(llama / "target"), "--data", str(llama / "prompts.jsonl"),
                  "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--batch-size", "2",
                  "--device", "cpu", "--no-progress"]
    with pytest.raises(KeyError, match=UNKNOWN_LLAMA):
        data_main(regenerate)
    # run as a command: one line that says how to load a plugin, status 2
    monkeypatch.setattr(sys, "argv", ["eagle-data", *regenerate])
    with pytest.raises(SystemExit) as exit_:
        data_main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {UNKNOWN_LLAMA}") and "--plugin" in err
    data_main([*regenerate, "--plugin", str(EXAMPLE)])
    conversations, _ = read_chat_jsonl(tmp_path / "out.jsonl")
    assert len(conversations) == 2 and all(c[-1]["role"] == "assistant" for c in conversations)
    vocab = ["vocab", "--tokenizer", str(llama / "target"), "--data", str(llama / "chat.jsonl"),
             "--draft-vocab-size", "32", "--out", str(tmp_path / "vocab.safetensors"), "--cache-dir",
             str(tmp_path / "cache")]
    # vocab reads the tokenizer and config.json's vocab_size only, not the registry: it runs either way
    assert data_main([*vocab, "--plugin", str(EXAMPLE)]) == 0 and (tmp_path / "vocab.safetensors").is_file()
    assert LLAMA in registry.known_targets()


def test_a_file_loads_once_under_a_stable_name(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLE.parents[1])
    first = plugins.load_plugins(["examples/llama_target.py"])
    assert LLAMA in registry.known_targets()
    again = plugins.load_plugins([str(EXAMPLE), "./examples/../examples/llama_target.py"])  # no "already registered"
    assert first == again[:1] == again[1:] == [plugins.file_module_name(EXAMPLE)]
    assert sys.modules[first[0]].LLAMA is registry.target_spec(LLAMA)


def write_module(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text("from eagle_trainer import registry\n" + body)


def test_a_dotted_module_from_sys_path(tmp_path, monkeypatch):
    write_module(tmp_path / "pkg" / "plugin_test_pkg", "targets",
                 "registry.register_target(registry.TargetSpec(architectures=('PluginTestForCausalLM',)))\n")
    (tmp_path / "pkg" / "plugin_test_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    assert plugins.load_plugins(["plugin_test_pkg.targets"]) == ["plugin_test_pkg.targets"]
    assert plugins.load_plugins(["plugin_test_pkg.targets"]) == ["plugin_test_pkg.targets"]  # a no-op
    assert registry.target_spec("PluginTestForCausalLM").architectures == ("PluginTestForCausalLM",)


def fake_distribution(site: Path, entry_points: str) -> None:
    """An installed distribution as importlib.metadata finds it on sys.path: <name>.dist-info with its entry points."""
    info = site / "plugin_test_dist-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-test-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{entry_points}")


def test_entry_points_load_in_every_command(llama, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "plugin_test_llama.py").write_text(EXAMPLE.read_text())  # the example plugin, installed
    write_module(site, "plugin_test_hook", "CALLS = []\n\ndef register():\n    CALLS.append(1)\n"
                 "    registry.register_target(registry.TargetSpec(architectures=('PluginHookForCausalLM',)))\n")
    fake_distribution(site, "llama = plugin_test_llama\nhook = plugin_test_hook:register\n")
    monkeypatch.syspath_prepend(str(site))
    assert sorted(plugins.load_plugins()) == ["plugin_test_hook", "plugin_test_llama"]
    plugins.load_plugins()  # the module imported once, the callable called once
    assert sys.modules["plugin_test_hook"].CALLS == [1]
    assert {LLAMA, "PluginHookForCausalLM"} <= set(registry.known_targets())
    # a command reads the group by itself: regenerate gets past the registry to the (empty) data file
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        data_main(["regenerate", "--target", str(llama / "target"), "--data", str(tmp_path / "empty.jsonl"),
                   "--out", str(tmp_path / "out.jsonl"), "--device", "cpu"])


def test_bad_plugins_are_named_with_the_fix(tmp_path, monkeypatch, capsys):
    with pytest.raises(plugins.PluginError, match=r"plugin 'plugin_test_nowhere' \(from --plugin\) could not be "
                                                  r"imported: ModuleNotFoundError.*on PYTHONPATH"):
        plugins.load_plugins(["plugin_test_nowhere"])
    with pytest.raises(plugins.PluginError, match=r"plugin 'nowhere/plugin\.py' \(from --plugin\): no such file "
                                                  r".*check that the file exists"):
        plugins.load_plugins(["nowhere/plugin.py"])
    write_module(tmp_path, "plugin_test_raises", "raise RuntimeError('no GPU here')\n")
    with pytest.raises(plugins.PluginError, match=r"plugin_test_raises\.py' \(from recipe plugins\) failed to load: "
                                                  r"RuntimeError: no GPU here; fix the plugin"):
        plugins.load_plugins([str(tmp_path / "plugin_test_raises.py")], source="recipe plugins")
    assert not any(m.startswith(plugins.FILE_MODULE_PREFIX + "plugin_test_raises") for m in sys.modules)
    write_module(tmp_path, "plugin_test_twice",
                 "registry.register_target(registry.TargetSpec(architectures=('Qwen3ForCausalLM',)))\n")
    with pytest.raises(plugins.PluginError, match="ValueError: target architecture 'Qwen3ForCausalLM' is already"):
        plugins.load_plugins([str(tmp_path / "plugin_test_twice.py")])
    # an entry point names its distribution
    fake_distribution(tmp_path / "site", "broken = plugin_test_gone:register\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(plugins.PluginError, match=r"plugin 'plugin_test_gone' \(from entry point broken = "
                                                  r"plugin_test_gone:register of plugin-test-dist"):
        plugins.load_plugins()
    # run as a command, a bad plugin ends it with one line and status 2
    monkeypatch.setattr(sys, "argv", ["eagle-export", "--checkpoint", "x", "--format", "sglang", "--out", "y"])
    with pytest.raises(SystemExit) as exit_:
        export_main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: plugin 'plugin_test_gone' (from entry point broken")


def test_only_the_commands_load_plugins():
    """Plugins come from the command line, the recipe and the installed entry points: no reader of a checkpoint,
    export or dump loads one, and nothing but plugins.py executes a module it is given."""
    package = Path(plugins.__file__).parents[1]
    callers, executors = set(), set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.endswith("load_plugins"):
                    callers.add(str(path.relative_to(package)))
                if name.endswith(("exec_module", "spec_from_file_location")):
                    executors.add(str(path.relative_to(package)))
    assert callers == {"app/data.py", "app/evaluate.py", "app/export.py", "app/train.py"}
    assert executors == {"app/plugins.py"}
