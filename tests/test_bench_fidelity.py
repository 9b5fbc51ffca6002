"""The fidelity benchmark end to end on the tiny model (a few steps): its figures are well-formed and
the modes behave as defined (user masks are the truth; attention masks never change)."""

import numpy as np

from jaxconcept.bench import fidelity


def test_fidelity_benchmark_on_tiny(tmp_path, capsys):
    result = fidelity.run_benchmark([0], str(tmp_path), model="tiny", token_steps=2, estep_every=1, joint_steps=1,
                                    num_timesteps=4, num_samples=4, sample_steps=2)
    table = result["table"]
    assert set(table) == {"attention", "em", "user"}
    for mode, row in table.items():
        assert len(row["iou_by_round"]) == 3  # stage 1 + 2 rounds
        assert 0.0 <= row["samples_found"] <= 1.0 and 0.0 <= row["iou_final"] <= 1.0
    np.testing.assert_allclose(table["user"]["iou_by_round"], 1.0)  # trained on the true masks
    assert len(set(np.round(table["attention"]["iou_by_round"], 6))) == 1  # never re-estimated
    assert (tmp_path / "runs" / "0" / "em" / "samples.png").exists()
    assert (tmp_path / "runs" / "0" / "user" / "unet").exists()  # joint tuning ran in every mode, with one base model
    fidelity.print_table(table)
    assert "attention" in capsys.readouterr().out
