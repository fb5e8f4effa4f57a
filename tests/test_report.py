"""The fit's HTML report: self-contained (plots as data URIs, nothing fetched from outside)
and rendered by a real browser (headless Chromium) with every plot decoded."""

import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from timemachine.fitting.report import PLOTS, write_fit_report

ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")

LABELS = [
    "3J(HN,HA):J3_HN_HA ALA2",
    "3J(HN,HA):J3_HN_HA ALA3",
    "3J(HN,C'):J3_HN_C ALA2",
    "1J(N,CA):J1_N_CA ALA2",
]
HELD_OUT = "3J(HA,C'):J3_HA_C ALA2"  # only in the validation, as with --holdout J3_HA_C
NAMES = ["torsion/C-N-CT-C/k3", "torsion/C-N-CT-C/k2", "torsion/N-CT-C-N/k1"]


def _epoch(epoch, params, chi2, sampled, rng):
    """One history record with the keys ``fit_equilibrium`` writes (nmr_fit's tiny run)."""
    k, p = len(LABELS), len(NAMES)
    rec = {
        "epoch": epoch,
        "params": list(params),
        "estimator": "fluctuation",
        "sampled": sampled,
        "reweight_ess": 40.0 if sampled else 31.5,
        "chi2": chi2,
        "chi2_stderr": 0.1 * chi2,
        "chi2_noise_bias": 0.3,
        "prior": 0.01 * epoch,
        "loss": chi2 + 0.01 * epoch,
        "observables": (np.array([6.6, 7.9, 0.66, 9.9]) - 0.3 * epoch).tolist(),
        "observable_errors": rng.uniform(0.03, 0.3, k).tolist(),
        "gradient": rng.normal(size=p).tolist(),
        "gradient_stderr": rng.uniform(0.1, 0.5, p).tolist(),
        "jacobian": rng.normal(size=(k, p)).tolist(),
        "jacobian_stderr": rng.uniform(0.01, 0.1, (k, p)).tolist(),
        "accepted": epoch != 2,
        "trust_radius": 0.2,
        "model_decrease": 1.5,
        "wall_s": 5.0,
        "converged": False,
    }
    if sampled:
        ess = rng.uniform(18, 40, k)
        rhat = rng.uniform(0.97, 1.07, k)
        rec.update(
            ess=ess.tolist(),
            ess_min=float(ess.min()),
            production_steps=5000,
            rhat=rhat.tolist(),
            rhat_max=float(rhat.max()),
        )
    if epoch:
        rec.update(predicted_decrease=2.4, actual_decrease=1.1)
    return rec


def _validation(mean, chi2, err, labels):
    k = len(labels)
    value = [5.68, 6.52, 1.13, 11.34, 1.84][:k]
    return {
        "labels": labels,
        "mean": mean,
        "stderr": [0.3] * k,
        "value": value,
        "uncertainty": [0.36, 0.36, 0.3, 0.53, 0.24][:k],
        "chi2": chi2 * k,
        "chi2_per_n": chi2,
        "chi2_per_n_stderr": err,
        "chi2_stderr_method": "delete-one-block jackknife over all chains' blocks",
        "groups": {"3J(HN,HA)": {"n": 2.0, "chi2_per_n": 6.25, "chi2_per_n_stderr": 6.59}},
        "n_frames": 20,
        "n_chains": 2,
        "n_blocks": 10,
        "simulated_ns": 0.02,
        "equilibration_ps": 100.0,
        "wall_s": 6.6,
        "ns_per_day": 5525.0,
        "platform": "Reference",
        "forcefield_files": ["fitted.xml"],
        "seeds": [1, 2],
        "settings": {"temperature_K": 300.0, "dt_ps": 0.002, "constraints": "HBonds"},
        "chain_mean": [mean, mean],
        "chain_chi2_per_n": [chi2, chi2],
        "holdout_chi2_per_n": 0.42 if chi2 > 5 else 0.17,
    }


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory):
    """A fit's output folder as ``run_nmr_fit`` leaves it (small, with the real keys)."""
    from timemachine.fitting.plots import plot_fit

    out = tmp_path_factory.mktemp("fit")
    rng = np.random.default_rng(0)
    theta0 = np.array([1.75728, 1.12968, 1.8828])
    steps = [theta0, theta0 * 1.05, theta0 * 1.08]
    epochs = [
        _epoch(0, steps[0], 8.030218553, True, rng),
        _epoch(1, steps[1], 6.909359876, False, rng),
        _epoch(2, steps[2], 7.2, True, rng),
    ]
    history = {
        "param_names": NAMES,
        "theta_initial": theta0.tolist(),
        "theta_final": (theta0 * 1.1).tolist(),
        "labels": LABELS,
        "target_values": [5.68, 6.52, 1.13, 11.34],
        "target_uncertainties": [0.36, 0.36, 0.3, 0.53],
        "info": {"estimator": "fluctuation", "stop_reason": "epochs", "horizon_steps": None},
        "epochs": epochs,
    }
    (out / "history.json").write_text(json.dumps(history))
    written = plot_fit(history, out)
    assert sorted(os.path.basename(p) for p in written) == sorted(f for f, _, _ in PLOTS)
    both = LABELS + [HELD_OUT]
    summary = {
        "system": "trialanine (H3N+-AAA-COO-), amber99sbildn + OBC2, 300 K",
        "data": "Graf, Nguyen, Stock & Schwalbe, J. Am. Chem. Soc. 129, 1179 (2007)",
        "targets": LABELS,
        "held_out": ["J3_HA_C"],
        "estimator": "fluctuation",
        "optimizer": "gauss-newton",
        "stop_reason": "χ²/N < 1.0 by more than its error <fits the data>",
        "parameters": NAMES,
        "original": theta0.tolist(),
        "fitted": steps[1].tolist(),
        "engine_chi2_per_n": {
            "before": 8.030218553,
            "before_stderr": 1.209380370,
            "after": 6.909359876,
            "after_stderr": 0.885141902,
            "after_epoch": 1,
            "after_freshly_sampled": False,
            "prior_after": 0.01,
            "prior_sigma": 2.0,
        },
        "effective_sample_sizes": [r.get("ess_min") for r in epochs],
        "reweighting_ess": [r["reweight_ess"] for r in epochs],
        "epochs": 3,
        "sampled_epochs": 2,
        "openmm_validation": {
            "original": _validation([7.35, 8.43, 1.05, 11.1, 2.09], 9.597374, 2.796, both),
            "fitted": _validation([6.82, 7.09, 1.07, 11.7, 2.0], 2.826374, 2.804, both),
        },
        "openmm_forcefield_files": {"fitted": ["fitted.xml"], "original": ["original.xml"]},
        "size": "tiny",
        "fit_wall_s": 11.9,
        "wall_s": 25.1,
    }
    (out / "summary.json").write_text(json.dumps(summary))
    write_fit_report(out)
    return out


def test_report_embeds_every_plot_and_fetches_nothing(fit_dir):
    text = (fit_dir / "report.html").read_text(encoding="utf-8")
    for filename, img_id, _ in PLOTS:
        m = re.search(rf'<img id="{img_id}" alt="[^"]*" src="data:image/png;base64,([^"]+)"', text)
        assert m, f"{filename} is not embedded"
        assert base64.b64decode(m.group(1)) == (fit_dir / filename).read_bytes()
    for pattern in (r"src\s*=\s*[\"']?https?:", r"href\s*=\s*[\"']?https?:", r"@import",
                    r"url\(\s*[\"']?https?:", r"<script[^>]+src", r"<link[^>]+stylesheet",
                    r"@font-face"):  # fmt: skip
        assert not re.search(pattern, text, re.I), f"external resource: {pattern}"
    assert not [f for f in os.listdir(fit_dir) if f.startswith(".tmp-")]


def test_report_shows_chi2_observables_parameters_and_diagnostics(fit_dir):
    text = (fit_dir / "report.html").read_text(encoding="utf-8")
    # χ²/N before and after, engine and OpenMM, with their errors
    for number in ("8.03 ± 1.2", "6.909 ± 0.89", "9.597 ± 2.8", "2.826 ± 2.8"):
        assert number in text
    assert "0.42" in text and "held-out couplings" in text  # holdout χ²/N, both models
    assert "6.25 ± 6.6" in text  # per coupling type
    # every observable, the held-out one too, against its target ± σ
    for label in LABELS + [HELD_OUT]:
        assert label.replace("'", "&#x27;") in text
    assert "11.34 ± 0.53" in text and "(held out)" in text
    # the parameter changes: start, fitted (the summary's: what fitted.xml holds), change
    assert "torsion/N-CT-C-N/k1" in text and "1.75728" in text
    assert f"{1.75728 * 1.05:.6g}" in text and "+5.0 %" in text
    # the estimator diagnostics per epoch
    for title in ("ESS min", "R̂ max", "reweighting ESS", "step accepted", "trust radius"):
        assert title in text
    assert "reweighted" in text and "31.5" in text
    # the stop reason, escaped; the settings
    assert "χ²/N &lt; 1.0 by more than its error &lt;fits the data&gt;" in text
    assert "<fits the data>" not in text
    assert "gauss-newton" in text and "fluctuation" in text and "Reference" in text


def test_report_of_an_incomplete_folder_says_what_is_missing(tmp_path):
    history = {"param_names": ["a"], "theta_initial": [1.0], "theta_final": [2.0]}
    (tmp_path / "history.json").write_text(json.dumps(dict(history, labels=[], epochs=[])))
    text = open(write_fit_report(tmp_path), encoding="utf-8").read()
    assert "summary.json" in text and "loss.png was not written" in text
    assert "<td>2</td>" in text  # the parameter change still shows


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(fit_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no chromium or chromium-browser on PATH (Debian: apt-get install chromium; "
            ".ci/run installs it when it runs as root)"
        )
    url = (fit_dir / "report.html").resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]  # fmt: skip
    env = dict(os.environ, HOME=str(tmp_path))
    shot = tmp_path / "report.png"
    subprocess.run(
        common + [f"--screenshot={shot}", url], env=env, capture_output=True, timeout=180
    )
    assert shot.is_file() and shot.stat().st_size > 20_000, "chromium wrote no screenshot"
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2000, 1200) and pixels.std() > 0.05  # not a blank page
    os.makedirs(ARTIFACTS, exist_ok=True)
    shutil.copy(shot, os.path.join(ARTIFACTS, "report.png"))
    # the DOM after load: the inline script marked each image that decoded
    dom = subprocess.run(
        common + ["--virtual-time-budget=10000", "--dump-dom", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    assert 'data-checked="1"' in dom, "the page's load event did not run"
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == len(PLOTS)
    for _, img_id, _ in PLOTS:
        (tag,) = [t for t in imgs if f'id="{img_id}"' in t]
        assert 'data-ok="1"' in tag, f"{img_id} did not decode in chromium"
