"""The command line: parsing, settings, exit codes that need no processing."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from qsmprep import __version__
from qsmprep.cli.run import build_parser, main, parse_args, validate_bids
from qsmprep.config import DEFAULT_METHODS, Config, ConfigError, method_choices


def _exit_code(argv, capsys=None):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    return exc.value.code


def test_usage_errors_exit_64(tmp_path):
    assert _exit_code([]) == 64
    assert _exit_code([str(tmp_path), str(tmp_path / "o"), "participant", "--nope"]) == 64
    assert _exit_code([str(tmp_path), str(tmp_path / "o"), "subject"]) == 64
    assert _exit_code([str(tmp_path / "missing"), str(tmp_path / "o"), "participant"]) == 64
    assert _exit_code([str(tmp_path), str(tmp_path), "participant"]) == 64
    argv = [str(tmp_path), str(tmp_path / "o"), "participant", "--inversion", "magic"]
    assert _exit_code(argv) == 64
    assert _exit_code([str(tmp_path), str(tmp_path / "o"), "participant", "--nprocs", "0"]) == 64


def test_group_level_without_participant_outputs(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "o"), "group"]) == 18
    assert "run the participant level first" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"qsmprep {__version__}"


def test_help_shows_defaults_and_registry_choices():
    text = build_parser().format_help()
    for stage, method in DEFAULT_METHODS.items():
        assert f"(default: {method}" in text, stage
    assert "beats RTS but not TV" in " ".join(text.split())
    for names in method_choices().values():
        for name in names:
            assert name in text
    assert "adaptive-unet" in method_choices()["inversion"]


def test_labels_are_stripped_and_defaults_apply(tmp_path):
    cfg = parse_args(
        [str(tmp_path), str(tmp_path / "out"), "participant",
         "--participant-label", "sub-01", "02", "sub-01", "--session-label", "ses-pre"]
    )  # fmt: skip
    assert cfg.execution.participant_label == ["01", "02"]
    assert cfg.execution.session_label == ["pre"]
    assert cfg.workflow.inversion == DEFAULT_METHODS["inversion"] == "tv"
    # "auto" masking resolves to ROMEO's voxel quality when ROMEO unwraps wrapped phase
    assert cfg.workflow.masking == "quality"
    assert cfg.execution.output_dir.is_absolute()
    assert cfg.resources.threads == cfg.resources.nprocs
    assert _exit_code([str(tmp_path), "o", "participant", "--participant-label", "0-1"]) == 64


def test_toml_config_file_and_command_line_precedence(tmp_path):
    toml = tmp_path / "qsmprep.toml"
    toml.write_text(
        'inversion = "tkd"\nbf-removal = "vsharp"\nomp-nthreads = 3\n'
        'participant-label = ["sub-07"]\nfield_strength = 7.0\nmcpc3ds = true\n'
    )
    base = [str(tmp_path), str(tmp_path / "out"), "participant", "--config-file", str(toml)]
    cfg = parse_args(base)
    assert cfg.workflow.inversion == "tkd" and cfg.workflow.mcpc3ds is True
    assert cfg.resources.omp_nthreads == 3 and cfg.resources.threads == 3
    assert cfg.execution.participant_label == ["07"]
    assert cfg.execution.field_strength == 7.0
    cfg = parse_args(base + ["--inversion", "rts", "--no-mcpc3ds", "--omp-nthreads", "1"])
    assert cfg.workflow.inversion == "rts" and cfg.workflow.mcpc3ds is False
    assert cfg.resources.omp_nthreads == 1
    toml.write_text('inversoin = "tkd"\n')
    assert _exit_code(base) == 64
    toml.write_text('inversion = "magic"\n')
    assert _exit_code(base) == 64


def test_config_rejects_bad_values(tmp_path):
    ok = {"bids_dir": tmp_path, "output_dir": tmp_path / "o"}
    with pytest.raises(ConfigError, match="field strength"):
        Config.from_options({**ok, "field_strength": -3})
    with pytest.raises(ConfigError, match="unknown setting"):
        Config.from_options({**ok, "colour": "blue"})
    with pytest.raises(ConfigError, match="use it with unwrapping romeo"):
        Config.from_options({**ok, "masking": "quality", "unwrapping": "laplacian"})
    with pytest.raises(ConfigError, match="model file not found"):
        Config.from_options({**ok, "inversion": "adaptive-unet", "model": tmp_path / "m.pt"})


def test_filter_and_plugin_files(tmp_path):
    flt = tmp_path / "filter.json"
    flt.write_text(json.dumps({"megre": {"acquisition": "hr"}}))
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 3\n")
    cfg = parse_args(
        [str(tmp_path), str(tmp_path / "o"), "participant",
         "--bids-filter-file", str(flt), "--use-plugin", str(plugin)]
    )  # fmt: skip
    assert cfg.execution.bids_filters == {"acquisition": "hr"}
    assert cfg.resources.plugin == {"plugin": "MultiProc", "plugin_args": {"n_procs": 3}}
    flt.write_text(json.dumps({"t1w": {}}))
    assert _exit_code([str(tmp_path), "o", "participant", "--bids-filter-file", str(flt)]) == 64


def _raw_dataset(root):
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.10.0", "DatasetType": "raw",
                    "Authors": ["qsmprep tests"]})
    )  # fmt: skip
    (root / "README").write_text("A test dataset.\n")
    (root / "sub-01" / "anat").mkdir(parents=True)
    return root


def test_nothing_selected_exits_18(tmp_path, capsys):
    import nibabel as nb
    import numpy as np

    root = _raw_dataset(tmp_path / "bids")
    img = nb.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_xyzt_units("mm")
    nb.save(img, root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    out = tmp_path / "out"
    argv = [str(root), str(out), "participant", "-w", str(tmp_path / "work")]
    assert main(argv + ["--skip-bids-validation"]) == 18
    assert "no multi-echo GRE run" in capsys.readouterr().err
    assert main(argv + ["--skip-bids-validation", "--participant-label", "sub-02"]) == 18
    assert "participant(s) not found" in capsys.readouterr().err
    assert not out.exists()


def test_invalid_dataset_exits_16(tmp_path, capsys):
    root = _raw_dataset(tmp_path / "bids")
    (root / "not_bids.txt").write_text("x")  # of the dataset, so in any selection
    assert any("NOT_INCLUDED" in e for e in validate_bids(root))
    assert main([str(root), str(tmp_path / "out"), "participant"]) == 16
    err = capsys.readouterr().err
    assert "not valid BIDS" in err and "--skip-bids-validation" in err


def test_refine_needs_the_adaptive_unet(tmp_path):
    ok = {"bids_dir": tmp_path, "output_dir": tmp_path / "o"}
    with pytest.raises(ConfigError, match="refines the adaptive U-Net"):
        Config.from_options({**ok, "refine": "finetune"})
    with pytest.raises(ConfigError, match="refine must be one of"):
        Config.from_options({**ok, "inversion": "adaptive-unet", "refine": "more"})
    with pytest.raises(ConfigError, match="refine-steps must be at least 1"):
        Config.from_options({**ok, "inversion": "adaptive-unet", "refine": "dip",
                             "refine_steps": 0})  # fmt: skip
    cfg = Config.from_options({**ok, "inversion": "adaptive-unet", "refine": "dip"})
    assert cfg.workflow.refine == "dip" and cfg.workflow.refine_steps is None
    assert "--refine {none,finetune,dip}" in build_parser().format_help()


def test_wrongly_typed_settings_are_usage_errors(tmp_path):
    from qsmprep.config import tomllib

    toml = tmp_path / "qsmprep.toml"
    base = [str(tmp_path), str(tmp_path / "out"), "participant", "--config-file", str(toml)]
    for line in ("participant-label = 1", 'field-strength = "3T"', 'mcpc3ds = "yes"',
                 "nprocs = 2.5", 'omp-nthreads = "2"', "work-dir = 3",
                 'stop-on-first-crash = "yes"', "clean-workdir = 1", "megre-suffix = 1",
                 "mem = true"):  # fmt: skip
        values = {k.replace("-", "_"): v for k, v in tomllib.loads(line).items()}
        with pytest.raises(ConfigError, match="must be"):
            Config.from_options({"bids_dir": tmp_path, "output_dir": tmp_path / "o", **values})
        if line != 'omp-nthreads = "2"':  # argparse parses a string default like an argument
            toml.write_text(line + "\n")
            assert _exit_code(base) == 64, line
    assert _exit_code(base[:3] + ["--participant-label", "ü1"]) == 64


def test_unknown_plugin_and_output_paths_are_usage_errors(tmp_path):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProcess\n")
    argv = [str(tmp_path), str(tmp_path / "o"), "participant", "--use-plugin", str(plugin)]
    assert _exit_code(argv) == 64
    with pytest.raises(ConfigError, match="unknown nipype plugin 'MultiProcess' .*MultiProc"):
        Config.from_options({"bids_dir": tmp_path, "output_dir": tmp_path / "o",
                             "use_plugin": plugin})  # fmt: skip
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert _exit_code([str(tmp_path), str(afile), "participant"]) == 64
    assert _exit_code([str(tmp_path), str(tmp_path / "o"), "participant", "-w", str(afile)]) == 64


def test_read_only_output_dir_exits_64(tmp_path, capsys):
    import nibabel as nb
    import numpy as np

    root = _raw_dataset(tmp_path / "bids")
    for part in ("mag", "phase"):
        img = nb.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
        nb.save(img, root / "sub-01" / "anat" / f"sub-01_part-{part}_MEGRE.nii.gz")
        meta = {"EchoTime": 0.01, "MagneticFieldStrength": 3.0}
        (root / "sub-01" / "anat" / f"sub-01_part-{part}_MEGRE.json").write_text(json.dumps(meta))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "out"
    if os.access(locked, os.W_OK):  # root ignores the mode: a path no one can create
        out = Path("/proc/qsmprep-test/out")
    argv = [str(root), str(out), "participant", "-w", str(tmp_path / "w"),
            "--skip-bids-validation"]  # fmt: skip
    assert main(argv) == 64
    err = capsys.readouterr().err
    assert f"cannot write to the output directory {out}" in err and "Traceback" not in err
    flt = tmp_path / "filter.json"
    flt.write_text(json.dumps({"megre": {"colour": "red"}}))
    argv = [argv[0], str(tmp_path / "o"), *argv[2:], "--bids-filter-file", str(flt)]
    assert main(argv) == 64
    assert "unknown BIDS entity in the filters: colour" in capsys.readouterr().err


def test_not_a_bids_dataset_exits_16_even_without_validation(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / "empty"), str(tmp_path / "out"), "participant",
            "--skip-bids-validation"]  # fmt: skip
    assert main(argv) == 16
    assert "not a BIDS dataset" in capsys.readouterr().err


def test_internal_error_exits_2_with_one_line_and_a_crash_file(tmp_path, capsys, monkeypatch):
    import qsmprep.interfaces.bids as ibids

    root = _raw_dataset(tmp_path / "bids")
    import nibabel as nb
    import numpy as np

    for part in ("mag", "phase"):
        nb.save(nb.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
                root / "sub-01" / "anat" / f"sub-01_part-{part}_MEGRE.nii.gz")  # fmt: skip
    (root / "sub-01" / "anat" / "sub-01_MEGRE.json").write_text('{"EchoTime": 0.01}')

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(ibids, "write_dataset_description", broken)
    argv = [str(root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
            "--skip-bids-validation"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "RuntimeError: disk on fire second line" in err
    crash = Path(err.split("crash file: ")[1].split(")")[0])
    assert crash.parent == tmp_path / "w" / "crash"
    assert "Traceback" in crash.read_text() and "broken" in crash.read_text()


def test_exception_text_is_one_line():
    from qsmprep.cli.run import exception_text

    crash = """Node: sub_01_wf.qsm_sub_01_wf.prepare_echoes

Traceback (most recent call last):
\t  File "x.py", line 1, in f
\t    raise HeaderDataError(f'Could not decompose affine:\\n{affine}')
\t    ^^^^^^^^^^^^^
\tnibabel.spatialimages.HeaderDataError: Could not decompose affine:
\t[[4. 0. 0. 0.]
\t [0. 0. 0. 1.]]
"""
    text = exception_text(crash.splitlines())
    assert text == "HeaderDataError: Could not decompose affine: [[4. 0. 0. 0.] [0. 0. 0. 1.]]"
    assert exception_text(["no traceback", "last line", ""]) == "last line"


def test_phase_sign_and_scale_options(tmp_path):
    base = [str(tmp_path), str(tmp_path / "o"), "participant"]
    cfg = parse_args(base + ["--phase-sign", "-1", "--phase-scale", "pi/4096"])
    assert cfg.workflow.phase_sign == "-1"
    assert cfg.workflow.phase_scale == pytest.approx(np.pi / 4096)
    assert parse_args(base).workflow.phase_sign == "auto"
    ok = {"bids_dir": tmp_path, "output_dir": tmp_path / "o"}
    assert Config.from_options({**ok, "phase_sign": 1}).workflow.phase_sign == "+1"  # TOML
    assert Config.from_options({**ok, "phase_scale": "2*pi/8192"}).workflow.phase_scale == (
        pytest.approx(np.pi / 4096)
    )
    assert Config.from_options({**ok, "phase_scale": 0.001}).workflow.phase_scale == 0.001
    for bad in ("pi/0", "-1", "two", "pi//2"):
        with pytest.raises(ConfigError, match="phase-scale"):
            Config.from_options({**ok, "phase_scale": bad})
    assert _exit_code(base + ["--phase-sign", "2"]) == 64
    assert _exit_code(base + ["--input-type", "fieldmap", "--phase-sign", "-1"]) == 64


def test_no_abbreviations_and_fmriprep_mem(tmp_path):
    base = [str(tmp_path), str(tmp_path / "o"), "participant"]
    # fMRIPrep's --mem is MB: 16000 MB, not --mem-gb 16000 by prefix matching
    assert parse_args(base + ["--mem", "16000"]).resources.mem_gb == pytest.approx(16)
    assert parse_args(base + ["--mem-mb", "512"]).resources.mem_gb == pytest.approx(0.512)
    assert parse_args(base + ["--mem_mb", "16G"]).resources.mem_gb == pytest.approx(16)
    assert parse_args(base + ["--mem", "1.5TB"]).resources.mem_gb == pytest.approx(1500)
    assert parse_args(base + ["--mem-gb", "8"]).resources.mem_gb == 8
    for bad in (
        ["--mem", "lots"],
        ["--mem", "0"],
        ["--mem", "16000", "--mem-gb", "16"],
        ["--mem-g", "8"],
        ["--nproc", "2"],
        ["--stop-on-first"],
        ["--config", "x"],
    ):
        assert _exit_code(base + bad) == 64, bad  # fmt: skip


def test_execution_flags_from_command_line_and_toml(tmp_path):
    base = [str(tmp_path), str(tmp_path / "o"), "participant"]
    ex = parse_args(base).execution
    assert not (ex.stop_on_first_crash or ex.write_graph or ex.resource_monitor
                or ex.clean_workdir)  # fmt: skip
    flags = ["--stop-on-first-crash", "--write-graph", "--resource-monitor", "--clean-workdir"]
    ex = parse_args(base + flags).execution
    assert ex.stop_on_first_crash and ex.write_graph and ex.resource_monitor and ex.clean_workdir
    toml = tmp_path / "c.toml"
    toml.write_text('stop-on-first-crash = true\nmem = "8G"\n')
    cfg = parse_args(base + ["--config-file", str(toml)])
    assert cfg.execution.stop_on_first_crash and cfg.resources.mem_gb == pytest.approx(8)


def test_resolved_settings_of_the_new_options_read_back(tmp_path):
    from qsmprep.cli.reporting import config_toml

    base = [str(tmp_path), str(tmp_path / "o"), "participant"]
    argv = base + ["--mem", "16G", "--megre-suffix", "MP2RAGE", "--stop-on-first-crash",
                   "--write-graph", "--clean-workdir"]  # fmt: skip
    toml = tmp_path / "resolved.toml"
    toml.write_text(config_toml(parse_args(argv), argv))
    cfg = parse_args(base + ["--config-file", str(toml)])
    assert cfg.resources.mem_gb == pytest.approx(16)  # mem-gb, not mem and mem-gb
    assert cfg.execution.bids_filters == {"suffix": ["MP2RAGE"]}
    assert cfg.execution.stop_on_first_crash and cfg.execution.write_graph
    assert not cfg.execution.clean_workdir  # resuming with these settings keeps the work


def test_megre_suffix(tmp_path):
    base = [str(tmp_path), str(tmp_path / "o"), "participant"]
    assert "suffix" not in parse_args(base).execution.bids_filters
    cfg = parse_args(base + ["--megre-suffix", "MP2RAGE", "T1w", "MP2RAGE"])
    assert cfg.execution.bids_filters == {"suffix": ["MP2RAGE", "T1w"]}
    flt = tmp_path / "filter.json"
    flt.write_text(json.dumps({"megre": {"inv": 2}}))
    cfg = parse_args(base + ["--megre-suffix", "MP2RAGE", "--bids-filter-file", str(flt)])
    assert cfg.execution.bids_filters == {"inv": 2, "suffix": ["MP2RAGE"]}
    assert _exit_code(base + ["--megre-suffix", "bold"]) == 64
    assert _exit_code(base + ["--megre-suffix", "T1w", "--input-type", "fieldmap"]) == 64
    flt.write_text(json.dumps({"megre": {"suffix": "T1w"}}))
    assert _exit_code(base + ["--megre-suffix", "T1w", "--bids-filter-file", str(flt)]) == 64
    # the filter file alone may select the suffix, too
    assert parse_args(base + ["--bids-filter-file", str(flt)]).execution.bids_filters == {
        "suffix": "T1w"
    }
