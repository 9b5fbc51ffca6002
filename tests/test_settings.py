"""Every config value checked once, up front: unknown fields (with the nearest name), types and ranges,
each refused with a message naming the field, the value and what is allowed; the command line exits 2."""

import os
import subprocess
import sys

import pytest

from jaxconcept import config, settings


def _cfg(**changes):
    c = config.get_config()
    for k, v in changes.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        with node.ignore_type():
            node[last] = v
    return c


def test_the_default_config_resolves_to_frozen_settings():
    s = settings.resolve(config.get_config())
    assert s.tokens.steps == 400 and s.tokens.rounds == 8 and s.tokens.round_steps(7) == 50
    assert s.total_steps == 800 and s.init.steps == 0 and s.masks.resolutions == (16, 8)
    assert settings.resolve(s) is s
    with pytest.raises(AttributeError):
        s.tokens.steps = 3
    assert "log_every" not in s.result_fields() and "checkpoint_every" not in s.result_fields()["joint"]


BAD = {
    "steps < 0": ({"tokens.steps": -5}, "config field tokens.steps = -5 is not allowed: use an integer >= 0"),
    "estep_every 0": ({"tokens.estep_every": 0}, "tokens.estep_every = 0 is not allowed: use an integer >= 1"),
    "lr 0": ({"tokens.lr": 0.0}, "tokens.lr = 0.0 is not allowed: use a number > 0.0"),
    "joint lr < 0": ({"joint.lr": -1e-6}, "joint.lr = -1e-06 is not allowed: use a number > 0.0"),
    "inversion lr": ({"init.inversion_lr": 0.0}, "init.inversion_lr = 0.0 is not allowed: use a number > 0.0"),
    "joint steps": ({"joint.steps": -1}, "joint.steps = -1 is not allowed: use an integer >= 0"),
    "log_every": ({"log_every": 0}, "log_every = 0 is not allowed: use an integer >= 1"),
    "flip_prob": ({"flip_prob": 1.5}, r"flip_prob = 1.5 is not allowed: use a number in \[0.0, 1.0\]"),
    "background level": ({"masks.background_level": -0.1}, r"masks.background_level = -0.1 .* in \[0.0, 1.0\]"),
    "timesteps": ({"masks.num_timesteps": 0}, "masks.num_timesteps = 0 is not allowed: use an integer >= 1"),
    "batch": ({"tokens.batch_size": 0}, "tokens.batch_size = 0 is not allowed: use an integer >= 1"),
    "fsdp": ({"mesh.fsdp": 0}, "mesh.fsdp = 0 is not allowed: use an integer >= 1"),
    "steps a float": ({"tokens.steps": 2.5}, "tokens.steps = 2.5 is not allowed: use an integer >= 0"),
    "steps a bool": ({"tokens.steps": True}, "tokens.steps = True is not allowed: use an integer >= 0"),
    "lr a string": ({"tokens.lr": "fast"}, "tokens.lr = 'fast' is not allowed: use a number > 0.0"),
    "crf a string": ({"masks.crf": "yes"}, "masks.crf = 'yes' is not allowed: use True or False"),
    "mode": ({"mode": "magic"}, "mode = 'magic' is not allowed: use one of 'em', 'attention', 'user'"),
    "init method": ({"init.method": "random"}, "init.method = 'random' is not allowed: use one of 'words'"),
    "optimizer": ({"joint.optimizer": "sgd"}, "joint.optimizer = 'sgd' is not allowed: use one of 'adamw'"),
    "remat": ({"joint.remat": "some"}, "joint.remat = 'some' is not allowed: use one of 'none', 'full', 'dots'"),
    "crf backend": ({"masks.crf_backend": "gpu"}, "masks.crf_backend = 'gpu' is not allowed: use one of 'host'"),
    "crf size": ({"masks.crf_size": "half"}, "masks.crf_size = 'half' is not allowed: use 'image', 'latent'"),
    "dtype": ({"dtype": "int8"}, "dtype = 'int8' is not allowed: use one of 'float32', 'bfloat16'"),
    "template": ({"template": "a photo"}, "template = 'a photo' is not allowed: use a string with '{}'"),
    "resolutions": ({"masks.resolutions": ()}, r"masks.resolutions = \(\) is not allowed: use a non-empty tuple"),
    "checkpoint_every": ({"joint.checkpoint_every": -1}, "joint.checkpoint_every = -1 .* integer >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_value_names_the_field_the_value_and_what_is_allowed(case):
    changes, message = BAD[case]
    with pytest.raises(settings.ConfigError, match=message):
        settings.resolve(_cfg(**changes))


def test_an_unknown_field_suggests_the_nearest():
    c = config.get_config()
    c.tokens.stepz = 3  # a notebook user's typo (ml_collections lets new fields in)
    with pytest.raises(settings.ConfigError, match=r"unknown config field 'tokens.stepz'. Did you mean tokens.steps"):
        settings.resolve(c)
    c = config.get_config()
    c.tokenz = 3
    with pytest.raises(settings.ConfigError, match="unknown config field 'tokenz'. Did you mean tokens"):
        settings.resolve(c)


def test_the_command_line_refuses_bad_config_with_exit_2_before_any_work(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args, message in ((["--config.tokens.stepz=3"], "unknown config field 'tokens.stepz'. Did you mean tokens.steps"),
                          (["--config.tokens.estep_every=0"], "tokens.estep_every = 0 is not allowed: use an integer >= 1"),
                          (["--config.tokens.steps=abc"], "tokens.steps = 'abc' is not allowed: use an integer >= 0")):
        proc = subprocess.run([sys.executable, "-m", "jaxconcept.train", "--out", str(tmp_path / "r"), *args],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr.replace('"', "'")
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "r").exists()


def test_the_names_settings_accepts_are_what_the_steps_build():
    """settings names the optimizers and remat policies without importing the model code; each name it accepts
    builds in steps, and steps builds no other."""
    from jaxconcept.em import steps

    assert set(settings.REMATS) == {"none", *steps.REMAT_POLICIES}
    for kind in settings.OPTIMIZERS:
        assert steps.make_optimizer(1e-3, kind=kind) is not None
    with pytest.raises(ValueError, match="use one of adamw, adamw_bf16, adafactor"):
        steps.make_optimizer(1e-3, kind="sgd")
