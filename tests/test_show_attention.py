"""The per-word attention command, end to end on the tiny model (4 simulated devices)."""

import numpy as np
from PIL import Image

from jaxconcept import show_attention


def test_writes_picture_and_maps(tmp_path, capsys):
    img = np.zeros((48, 64, 3), np.uint8)
    img[:] = (40, 160, 60)
    img[10:30, 8:30] = (200, 30, 30)
    Image.fromarray(img).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    rc = show_attention.main(["--image", str(tmp_path / "scene.png"), "--prompt", "a red dog on green grass",
                              "--timesteps", "6", "--out", str(out)])
    assert rc == 0
    data = np.load(out / "attention.npz")
    assert list(data["words"]) == ["a", "red", "dog", "on", "green", "grass"]
    assert data["maps"].shape == (6, 16, 16)
    assert data["timesteps"].shape == (8,)  # 6 rounded up to whole batches on 4 devices
    np.testing.assert_allclose(data["maps"].max(axis=(1, 2)), 1.0, rtol=1e-5)
    picture = np.asarray(Image.open(out / "attention.png"))
    assert picture.shape[0] > 200 and picture.shape[1] > 6 * 128


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    assert show_attention.main(["--image", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert show_attention.main(["--image", str(tmp_path / "broken.png"), "--out", str(tmp_path)]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert show_attention.main(["--resolutions", "16,x", "--out", str(tmp_path)]) == 2
    assert show_attention.main(["--model", "./no/such/dir/", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
