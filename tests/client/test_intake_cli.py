"""``fedcmr-client ingest``: help, the summary table and file, exit status only for user errors."""

from __future__ import annotations

import json

from dicom_factory import write_bad_file, write_cine_series
from typer.testing import CliRunner

from client.cli import app


def test_help_describes_the_command():
    # Execute
    result = CliRunner().invoke(app, ["ingest", "--help"])

    # Assert
    assert result.exit_code == 0
    assert "--out" in result.output and "--labels" in result.output and "--format" in result.output


def test_skipped_files_are_reported_not_fatal(tmp_path):
    # Prepare
    write_cine_series(tmp_path / "export", slices=2, phases=2, rows=16, cols=16)
    write_bad_file("not_dicom_text", tmp_path / "export" / "README")

    # Execute
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "export"), "--out",
                                      str(tmp_path / "store"), "data.crop_px=16"])

    # Assert: exit 0, the table on stdout, the JSON summary in the store
    assert result.exit_code == 0, result.output
    assert "skipped: not_dicom" in result.output and "files accepted" in result.output
    summary = json.loads((tmp_path / "store" / "ingest-summary.json").read_text())
    assert {k: summary[k] for k in ("files_seen", "files_accepted", "series", "skipped")} == {
        "files_seen": 5, "files_accepted": 4, "series": 1, "skipped": {"not_dicom": 1}}


def test_user_errors_exit_with_status_2(tmp_path):
    # Prepare
    (tmp_path / "export").mkdir()
    write_cine_series(tmp_path / "export", slices=1, phases=1, rows=16, cols=16)
    runner = CliRunner()

    # Execute
    missing = runner.invoke(app, ["ingest", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")])
    bad_format = runner.invoke(app, ["ingest", str(tmp_path / "export"), "--out",
                                     str(tmp_path / "s"), "--format", "nrrd"])
    bad_key = runner.invoke(app, ["ingest", str(tmp_path / "export"), "--out", str(tmp_path / "s"),
                                  "data.crop=16"])
    source_in_store = runner.invoke(app, ["ingest", str(tmp_path / "export"), "--out", str(tmp_path)])
    runner.invoke(app, ["ingest", str(tmp_path / "export"), "--out", str(tmp_path / "s2")])
    other_grid = runner.invoke(app, ["ingest", str(tmp_path / "export"), "--out",
                                     str(tmp_path / "s2"), "data.crop_px=64"])

    # Assert
    assert [r.exit_code for r in (missing, bad_format, bad_key, source_in_store, other_grid)] == [2] * 5
    assert "does not exist" in missing.output
    assert "data.crop" in bad_key.output
    assert "'nrrd' is not one of" in bad_format.output
    assert "lies inside the store" in source_in_store.output
    assert "not 1.5 mm / 64 px" in other_grid.output


def test_a_store_inside_the_export_is_not_ingested_again(tmp_path):
    # Prepare
    write_cine_series(tmp_path / "export", slices=2, phases=2, rows=16, cols=16)
    runner = CliRunner()
    args = ["ingest", str(tmp_path / "export"), "--out", str(tmp_path / "export" / "store"),
            "data.crop_px=16"]

    # Execute
    first, second = runner.invoke(app, args), runner.invoke(app, args)

    # Assert
    assert first.exit_code == second.exit_code == 0
    summary = json.loads((tmp_path / "export" / "store" / "ingest-summary.json").read_text())
    assert (summary["files_seen"], summary["skipped"]) == (4, {})
