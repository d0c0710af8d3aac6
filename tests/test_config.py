import pytest

from megadiff.config import _redact, available_recipes, load_config, parse_overrides


def test_recipes_ship_inside_the_package():
    assert {"tiny-cpu", "sd3m-full-ft"} <= set(available_recipes())


def test_dotted_overrides_are_typed_and_applied():
    cfg = load_config("tiny-cpu", ["optim.lr=2e-4", "data.micro_batch_size=3", "flow.shift=3",
                                   "validation.prompts=[a, b]", "deepspeed.zero_stage=2"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.flow.shift, float) and cfg.flow.shift == 3.0
    assert cfg.data.micro_batch_size == 3 and cfg.validation.prompts == ["a", "b"]
    assert cfg.deepspeed.zero_stage == 2


@pytest.mark.parametrize("override, fragment", [
    (["optim.lrr=1"], "unknown config key optim.lrr"),
    (["data.micro_batch_size=two"], "data.micro_batch_size='two' has the wrong type"),
    (["flow.timestep_sampling=gaussian"], "flow.timestep_sampling='gaussian' is not allowed"),
    (["objectives=[nope]"], "objective 'nope' is unknown"),
    (["optim.betas=[0.9]"], "optim.betas must have 2 items"),
    (["train.max_steps=0"], "train.max_steps=0 must be at least 1"),
    (["optim.lr"], "is not key=value"),
])
def test_bad_config_is_one_line_valueerror_naming_the_key(override, fragment):
    with pytest.raises(ValueError) as e:
        load_config("tiny-cpu", override)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="recipe 'nope' does not exist: use one of .*tiny-cpu"):
        load_config("nope")


def test_real_recipe_requires_a_model_path():
    with pytest.raises(ValueError, match="model.path is not set"):
        load_config("sd3m-full-ft", ["data.local=/x"])


def test_batch_sizes_must_multiply_to_the_global_batch():
    cfg = load_config("tiny-cpu", ["data.micro_batch_size=2", "data.gradient_accumulation_steps=3",
                                   "data.global_batch_size=12"])
    assert cfg.check_batch(world_size=2) == 12
    with pytest.raises(ValueError, match=r"global_batch_size=12 but .* x world size \(4\) = 24"):
        cfg.check_batch(world_size=4)


def test_recipe_yaml_path_and_inherit(tmp_path):
    child = tmp_path / "mine.yaml"
    child.write_text("inherit: tiny-cpu\noptim: {lr: 0.5}\n")
    cfg = load_config(str(child))
    assert cfg.optim.lr == 0.5 and cfg.optim.schedule == "cosine" and cfg.demo.enabled


def test_secrets_are_redacted():
    out = _redact({"logging": {"api_key": "abc", "hf_token": "hf_x", "project": "p"}, "n": [{"password": "z"}]})
    assert out == {"logging": {"api_key": "<redacted>", "hf_token": "<redacted>", "project": "p"},
                   "n": [{"password": "<redacted>"}]}


def test_override_values_parse_as_yaml():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=null"]) == \
        {"a": {"b": 1, "c": "x"}, "d": [1, 2], "e": None}
