"""The command line: parsing, settings, exit codes that need no processing."""

import json

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


def test_group_level_not_yet_available(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "o"), "group"]) == 64
    assert "not yet available" in capsys.readouterr().err


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
    (root / "sub-01" / "anat" / "not_bids.txt").write_text("x")
    assert any("NOT_INCLUDED" in e for e in validate_bids(root))
    assert main([str(root), str(tmp_path / "out"), "participant"]) == 16
    err = capsys.readouterr().err
    assert "not valid BIDS" in err and "--skip-bids-validation" in err


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
