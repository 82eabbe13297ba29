import pytest

"""The sweep table (`python -m ldm.results`) on a sweep directory the test writes, and a real
two-job `train.py -m` sweep end to end."""
import csv
import json
import subprocess
import sys
from pathlib import Path

from test_entrypoints import ROOT, tiny_train_overrides
from wandb.proto import wandb_internal_pb2 as pb

from conftest import subprocess_env
from ldm.results import main, summarize, swept_keys
from wandb_records import _payloads

METRICS = "step,train/loss,val/adherence_all,val/loss,val/loss_min_snr,val/mse_eps,val/mse_x0\n"


def fake_sweep(root: Path) -> Path:
    sweep = root / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - diffusion.prediction=eps,v\n"
        "    - trainer.max_steps=10\n"
    )
    curves = {"0": [(5, 0.40, 0.1), (10, 0.30, 0.5)], "1": [(5, 0.20, 0.2), (10, 0.25, 0.4)]}
    for job, prediction in (("0", "eps"), ("1", "v"), ("2", "v")):
        d = sweep / job / ".hydra"
        d.mkdir(parents=True)
        (d / "overrides.yaml").write_text(
            f"- diffusion.prediction={prediction}\n- trainer.max_steps=10\n"
        )
        if job in curves:  # job 2 died before its first validation
            rows = "".join(f"{s},1.0,{a},9.0,{m},2.0,{m * 3}\n" for s, m, a in curves[job])
            (sweep / job / "metrics.csv").write_text(METRICS + rows)
    return sweep


def test_swept_keys_are_the_comma_overrides_of_the_multirun(tmp_path):
    assert swept_keys(fake_sweep(tmp_path)) == ["diffusion.prediction"]
    assert swept_keys(tmp_path) == []  # no multirun.yaml


def test_swept_keys_leave_interpolations_in_overrides_unresolved(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - optim.lr=1e-3,2e-3\n"
        "    - data.train_shards=${root:}/x/*.tar\n"
    )
    assert swept_keys(tmp_path) == ["optim.lr"]


def test_summarize_writes_table_csv_and_plot_and_counts_skipped_jobs(tmp_path, capsys):
    paths = summarize(fake_sweep(tmp_path))
    assert "skipped 1 job(s) without metrics: 2" in capsys.readouterr().err
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["diffusion.prediction"], r["step"]) for r in rows] == [
        ("0", "eps", "10"),
        ("1", "v", "10"),
    ]
    assert "trainer.max_steps" not in rows[0]  # the same in every job: not a column
    assert float(rows[0]["val/loss_min_snr"]) == 0.3 and float(rows[1]["val/loss_min_snr"]) == 0.25
    assert float(rows[1]["best val/loss_min_snr"]) == 0.2  # lower is better for losses
    assert float(rows[0]["best val/adherence_all"]) == 0.5  # higher is better for accuracies
    md = paths["md"].read_text().splitlines()
    assert (
        md[0].startswith("| job | diffusion.prediction | step | val/loss_min_snr |")
        and len(md) == 4
    )
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_a_directory_without_jobs_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="1"):
        main([str(tmp_path)])
    err = capsys.readouterr().err
    assert err.startswith("error: no job in") and "metrics.csv" in err
    with pytest.raises(SystemExit, match="1"):
        main([str(tmp_path / "missing")])


def run_records(run_file: Path) -> tuple[pb.RunRecord, dict]:
    """The run record (name, group) and the logged config of an offline W&B run."""
    run, config = None, {}
    for payload in _payloads(run_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert run is not None, f"no run record in {run_file}"
    return run, config


# Two real two-step trainings in one process: ~12 s on 2 idle cores.
def test_multirun_gives_one_directory_and_one_wandb_run_per_combination(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_train_overrides(tmp_path) if not o.startswith("hydra.run.dir")]
    overrides += ["trainer.max_steps=2"]
    env = subprocess_env(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "diffusion.weighting=uniform,min_snr",
            *overrides,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = []
    for job, weighting in (("0", "uniform"), ("1", "min_snr")):
        assert (sweep / job / "model.safetensors").is_file()
        with open(sweep / job / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["step"] for r in rows] == ["2"]
        assert {
            "val/loss",
            "val/mse_x0",
            "val/mse_eps",
            "val/loss_min_snr",
            "val/adherence_all",
            "val/adherence_shape",
        } <= set(rows[0])
        (run_file,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        run, config = run_records(run_file)
        runs.append(run)
        assert run.display_name == f"shapes:diffusion.weighting={weighting}"  # the swept value only
        assert config["diffusion"]["weighting"] == weighting
    assert runs[0].run_group == runs[1].run_group == "sweep-" + "-".join(sweep.parts[-2:])
    paths = summarize(sweep)
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["diffusion.weighting"] for r in table] == ["uniform", "min_snr"]


def test_several_sweep_dirs_are_one_table_with_the_per_sweep_value_as_a_column(tmp_path):
    for prediction in ("eps", "v"):
        sweep = tmp_path / prediction
        (sweep).mkdir()
        (sweep / "multirun.yaml").write_text(
            "hydra:\n  overrides:\n    task:\n    - diffusion.weighting=uniform,min_snr\n"
        )
        for job, weighting in (("0", "uniform"), ("1", "min_snr")):
            (sweep / job / ".hydra").mkdir(parents=True)
            (sweep / job / ".hydra" / "overrides.yaml").write_text(
                f"- diffusion.prediction={prediction}\n- diffusion.weighting={weighting}\n"
            )
            (sweep / job / "metrics.csv").write_text(METRICS + "10,1.0,0.5,9.0,0.3,2.0,0.9\n")
    paths = summarize([tmp_path / "eps", tmp_path / "v"], out_dir=tmp_path / "out")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["diffusion.weighting"], r["diffusion.prediction"]) for r in rows] == [
        ("eps/0", "uniform", "eps"),
        ("eps/1", "min_snr", "eps"),
        ("v/0", "uniform", "v"),
        ("v/1", "min_snr", "v"),
    ]
