"""Typed configs: YAML with `base:` includes, key=value overrides, and errors that name the offending key."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlpt.config import Config, ConfigError, describe, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.method.losses == ["itc", "itm", "mlm"]
    assert cfg.train.steps == 1000


def test_yaml_base_includes_merge_in_order(tmp_path):
    write(tmp_path / "model" / "a.yaml", """
model:
  text: {width: 64, heads: 2, text_layers: 5}
  vision: {image_size: 48}
method: {losses: [itc], loss_weights: {itc: 2.0, mlm: 3.0}}
train: {steps: 7}
""")
    write(tmp_path / "model" / "b.yaml", """
base: [a.yaml]
model:
  text: {heads: 4}
train: {steps: 8, seed: 3}
""")
    child = write(tmp_path / "run" / "child.yaml", """
base: [../model/b.yaml]
model:
  text: {width: 96}
method: {loss_weights: {itm: 0.5}}
train: {steps: 9}
""")
    cfg = load_config(child)
    assert cfg.model.text.width == 96          # child wins
    assert cfg.model.text.heads == 4           # b over a
    assert cfg.model.text.text_layers == 5     # from a, through b
    assert cfg.model.text.intermediate == 512  # untouched default kept inside a merged section
    assert cfg.model.vision.image_size == 48
    assert cfg.method.losses == ["itc"]
    assert cfg.method.loss_weights == {"itm": 0.5}  # a dict value is replaced, not merged
    assert (cfg.train.steps, cfg.train.seed) == (9, 3)


def test_later_bases_override_earlier(tmp_path):
    write(tmp_path / "one.yaml", "train: {steps: 1, seed: 1}\n")
    write(tmp_path / "two.yaml", "train: {steps: 2}\n")
    cfg = load_config(write(tmp_path / "c.yaml", "base: [one.yaml, two.yaml]\n"))
    assert (cfg.train.steps, cfg.train.seed) == (2, 1)


def test_overrides_parse_types():
    cfg = load_config(overrides=["train.steps=10", "optim.lr=0.001", "optim.min_lr=1e-6", "method.alpha=1",
                                 "train.progress=false", "data.skip_bad=yes", "train.out=runs/x y",
                                 "method.losses=[itc,itm]", "optim.betas=[0.9, 0.98]",
                                 "method.loss_weights={itc: 2, mlm: 0.5}", "train.resume="])
    assert cfg.train.steps == 10 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    assert cfg.optim.min_lr == 1e-6 and type(cfg.optim.min_lr) is float  # YAML reads "1e-6" as a string
    assert cfg.method.alpha == 1.0 and type(cfg.method.alpha) is float
    assert cfg.train.progress is False and cfg.data.skip_bad is True
    assert cfg.train.out == "runs/x y"
    assert cfg.method.losses == ["itc", "itm"]
    assert cfg.optim.betas == [0.9, 0.98]
    assert cfg.method.loss_weights == {"itc": 2, "mlm": 0.5}
    assert cfg.train.resume == ""


def test_overrides_win_over_file_and_base_dict(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {steps: 5, seed: 5}\nmodel: {text: {width: 64}}\n")
    base = {"train": {"steps": 1, "seed": 1, "log_every": 3}, "model": {"text": {"heads": 8}}}
    cfg = load_config(path, ["train.steps=6"], base=base)
    assert (cfg.train.steps, cfg.train.seed, cfg.train.log_every) == (6, 5, 3)
    assert (cfg.model.text.width, cfg.model.text.heads) == (64, 8)
    assert base["train"]["steps"] == 1  # the caller's dict is not modified


def test_round_trip_through_dict():
    cfg = load_config(overrides=["method.losses=[itm]", "optim.lr=0.002", "model.vision.depth=2"])
    assert load_config(base=cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,named,suggested", [
    ("train.stesp=3", "train.stesp", "train.steps"),
    ("model.text.widht=3", "model.text.widht", "model.text.width"),
    ("modle.text.width=3", "modle", "model"),
    ("method.queue=3", "method.queue", "method.queue_size"),
])
def test_unknown_key_names_it_and_suggests(override, named, suggested):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    msg = str(err.value)
    assert f"'{named}'" in msg and f"'{suggested}'" in msg


def test_unknown_key_without_near_match_lists_valid_keys():
    with pytest.raises(ConfigError, match="train.zzzzzz") as err:
        load_config(overrides=["train.zzzzzz=1"])
    assert "steps" in str(err.value) and "seed" in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "optim: {lr: 0.1, warmup_stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"optim\.warmup_stpes.*optim\.warmup_steps"):
        load_config(path)


@pytest.mark.parametrize("override,key", [
    ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=[1]", "optim.lr"),
    ("method.alpha=true", "method.alpha"),
    ("train.progress=maybe", "train.progress"),
    ("method.losses=itc", "method.losses"),
    ("method.loss_weights=[1]", "method.loss_weights"),
    ("model.text=3", "model.text"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


def test_a_str_key_takes_an_override_as_text_but_not_a_yaml_list(tmp_path):
    assert load_config(overrides=["train.out=[a]"]).train.out == "[a]"  # overrides: a str key's text as it is
    with pytest.raises(ConfigError, match="'train.out'"):
        load_config(write(tmp_path / "c.yaml", "train: {out: [a]}\n"))  # YAML files stay YAML


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(write(tmp_path / "c.yaml", "base: [nope.yaml]\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "broken.yaml", "train: {steps: [1\n"))


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}


SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "demo")  # demo/: overrides (test_demo)


def test_configs_are_shipped():
    assert len(SHIPPED) >= 4


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    t, v = cfg.model.text, cfg.model.vision
    assert t.width % t.heads == 0 and v.width % v.heads == 0
    assert v.image_size % v.patch_size == 0
    assert cfg.method.losses and all(isinstance(x, str) for x in cfg.method.losses)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name == "pretrain"],
                         ids=lambda p: p.name)
def test_shipped_pretrain_config_names_a_registered_method(path):
    from vlpt import methods
    assert load_config(path).method.name in methods.available()


def built_in_methods() -> set[str]:
    from vlpt import methods
    return {n for n in methods.available() if methods.registry.get(n).__module__.startswith("vlpt.methods.")}


def test_the_shipped_presets_are_a_tiny_and_a_base_per_method_and_per_finetuned_task():
    """README, Adding a method: a method is its file and the presets NAME_{tiny,base}.yaml (and variants
    NAME_tiny_VARIANT.yaml: issue 13's binding recipe for the four methods it names); the model presets underneath
    them. A task that trains ships finetune/TASK_tiny.yaml and base presets TASK[_DATASET]_base.yaml, each selecting
    its task."""
    from vlpt.tasks import registry
    assert built_in_methods() == {"albef", "codis", "maskvlm", "cbvila", "simla", "semmim"}
    shipped = {p.relative_to(CONFIGS).as_posix() for p in SHIPPED}
    assert {p for p in shipped if not p.startswith("finetune/")} == {
        "model/tiny.yaml", "model/base.yaml",
        *(f"pretrain/{m}_{size}.yaml" for m in built_in_methods() for size in ("tiny", "base")),
        *(f"pretrain/{m}_tiny_binding.yaml" for m in ("albef", "codis", "maskvlm", "cbvila"))}
    trained = {name for name in registry.names() if registry.get(name).trains}
    finetune = [p for p in SHIPPED if p.parent.name == "finetune"]
    assert {p.stem.split("_")[0] for p in finetune} == trained
    for task in trained:
        names = {p.stem for p in finetune if p.stem.split("_")[0] == task}
        assert f"{task}_tiny" in names and any(n.endswith("_base") for n in names), names
    for path in finetune:
        assert load_config(path).task.name == path.stem.split("_")[0], path


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name == "pretrain"], ids=lambda p: p.name)
def test_every_pretrain_preset_passes_methods_check_as_the_method_it_is_named_for(path):
    """What `vlpt pretrain` checks before any work: the method exists and knows every loss listed or weighted."""
    from vlpt import methods

    cfg = load_config(path)
    method, size = path.stem.split("_")[:2]  # NAME_SIZE[_VARIANT]
    cls = methods.check(cfg)
    assert cls.name == cfg.method.name == method and type(cfg.method) is cls.config
    assert cfg.method.losses and set(cfg.method.losses) <= set(cls.loss_names)
    assert set(cfg.method.loss_weights) <= set(cfg.method.losses)  # a weight on a loss not trained is a slip
    assert (cfg.model.text.width, cfg.model.vision.width) == {"tiny": (128, 128), "base": (768, 768)}[size]


def dataclass_leaves(cls, prefix: str = "") -> set[str]:
    """Every non-dataclass field under `cls`, dotted, found by walking the dataclasses themselves."""
    import dataclasses
    import typing

    hints, found = typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= dataclass_leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            found.add(prefix + f.name)
    return found


def test_vlpt_config_lists_every_leaf_of_every_dataclass_once(capsys):
    """`vlpt config` (`describe`): the shared sections' leaves, and every registered method's and task's own ones
    under method.* and task.*, each listed once with a help line."""
    from vlpt import methods, tasks
    from vlpt.cli import main

    expected = dataclass_leaves(Config)
    for registry, section in ((methods.registry, "method"), (tasks.registry, "task")):
        for name in registry.names():
            entry = registry.get(name)
            if hasattr(entry, "config"):
                expected |= dataclass_leaves(entry.config, f"{section}.")
    assert {"method.codebook.plan_features", "method.cbvila.estimator", "method.maskvlm.region",
            "method.codebook.size", "model.text.pool", "task.checkpoint"} <= expected
    rows = describe()
    keys = [k for k, _, _ in rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert all(help_ for _, _, help_ in rows)
    main(["config"])
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert sorted(printed) == sorted(expected)


def test_pretrain_configs_inherit_their_model():
    tiny = load_config(CONFIGS / "pretrain" / "albef_tiny.yaml")
    assert (tiny.model.text.width, tiny.model.text.text_layers, tiny.model.vision.image_size) == (128, 2, 64)
    assert tiny.train.out == "runs/albef_tiny"
    base = load_config(CONFIGS / "pretrain" / "albef_base.yaml")
    assert (base.model.text.width, base.model.vision.depth, base.optim.lr) == (768, 12, 1.0e-4)


def test_describe_lists_every_key():
    keys = {k for k, _, _ in describe()}
    assert {"train.steps", "model.text.width", "method.losses", "eval.k"} <= keys
    assert all(help_ for _, _, help_ in describe())


def test_a_misnamed_loss_is_an_error_naming_the_nearest():
    from vlpt import methods

    with pytest.raises(ConfigError, match="no loss 'itmm'; did you mean 'itm'"):
        methods.check(load_config(overrides=["method.losses=[itc,itmm]"]))
    with pytest.raises(ConfigError, match="no loss 'codebook'"):
        methods.check(load_config(overrides=["method.losses=[itc,codebook]"]))  # ALBEF has none
    assert methods.check(load_config(overrides=["method.name=codis", "method.losses=[itc,codebook]"])).name == "codis"
