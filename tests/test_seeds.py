"""seeds.py's aggregation on hand-made seed folders: medians and ranges, each seed's intervals, the stage-time
and per-family tables, and the README block rewritten between its markers (and only there)."""
import json
import os

import pytest

import seeds


def fake_seed(root, seed, ppo_pass, sft_pass, fam_ppo):
    run = root / f"seed_{seed}"
    for stage in ("ppo", "oracle"):
        (run / stage).mkdir(parents=True)
    results = {"seed": seed, "split": "test", "n_prompts": 10, "samples_per_prompt": 4,
               "sft_pass": sft_pass, "sft_pass_greedy": 0.5, "ppo_pass": ppo_pass, "ppo_pass_greedy": 0.6,
               "ppo_gain": ppo_pass - sft_pass, "ppo_gain_ci95": [0.01, 0.2], "ppo_gain_greedy": 0.1,
               "ppo_gain_greedy_ci95": [-0.01, 0.2], "ppo_win_rate": 0.7, "ppo_win_rate_ci95": [0.6, 0.8],
               "ppo_kl": 2.0, "total_seconds": 100 * seed, "stage_seconds": {"pretrain": 60 * seed, "ppo": 40 * seed}}
    (run / "results.json").write_text(json.dumps(results))
    fam = {"howto": {"pass_rate": fam_ppo, "prompts": 6}, "add": {"pass_rate": 0.1, "prompts": 4}}
    (run / "ppo" / "summary.json").write_text(json.dumps({"sft_by_family": {k: dict(v, pass_rate=0.0) for k, v in
                                                                            fam.items()}, "policy_by_family": fam}))
    (run / "oracle" / "summary.json").write_text(json.dumps({"policy_by_family": fam}))


def test_seed_table_medians_ranges_stage_times_families_and_the_readme_block(tmp_path):
    runs = tmp_path / "runs"
    for seed, ppo_pass, fam in ((1, 0.30, 0.2), (2, 0.50, 0.4), (3, 0.40, 0.9)):
        fake_seed(runs, seed, ppo_pass, 0.2, fam)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{seeds.BEGIN}\nold table\n{seeds.END}\nafter\n")
    seeds.main(seeds.Config(runs=str(runs), out=str(tmp_path / "results"), readme=str(readme), run=False))
    out = json.load(open(tmp_path / "results" / "seeds.json"))
    assert out["summary"]["ppo_pass"] == {"median": 0.40, "min": 0.30, "max": 0.50, "values": [0.30, 0.50, 0.40]}
    assert out["summary"]["ppo_gain"]["median"] == pytest.approx(0.20)
    md = open(tmp_path / "results" / "seeds.md").read()
    assert "| PPO pass rate (sampled) | **0.400** | 0.300 | 0.500 | 0.300 | 0.500 | 0.400 |" in md
    assert "| 2 | +0.300 [+0.010, +0.200] | +0.100 [-0.010, +0.200] | 0.700 [0.600, 0.800] |" in md
    assert "| pretrain | ppo | total |" in md and "| 120 (60-180) | 80 (40-120) | 200 (100-300) |" in md
    assert "| howto | 6 | 0.000 | 0.400 | 0.400 |" in md and "| add | 4 | 0.000 | 0.100 | 0.100 |" in md
    text = readme.read_text()
    assert text.startswith("intro\n" + seeds.BEGIN + "\n") and text.endswith(seeds.END + "\nafter\n")
    assert "old table" not in text and md in text


def test_a_missing_seed_or_readme_block_is_one_error(tmp_path):
    fake_seed(tmp_path / "runs", 1, 0.3, 0.2, 0.2)
    with pytest.raises(SystemExit, match="seed_2/results.json does not exist"):
        seeds.main(seeds.Config(seeds="1,2", runs=str(tmp_path / "runs"), out=str(tmp_path / "r"), readme="", run=False))
    (tmp_path / "README.md").write_text("no block here\n")
    with pytest.raises(SystemExit, match="has no results block"):
        seeds.main(seeds.Config(seeds="1", runs=str(tmp_path / "runs"), out=str(tmp_path / "r"),
                                readme=str(tmp_path / "README.md"), run=False))
    assert (tmp_path / "README.md").read_text() == "no block here\n"
    with pytest.raises(SystemExit, match="--seeds"):
        seeds.main(seeds.Config(seeds="a,b", runs=str(tmp_path / "runs"), readme="", run=False))
    assert os.listdir(tmp_path / "runs") == ["seed_1"]
