"""Every bad input the README's troubleshooting table lists: one clear message, exit 2, nothing overwritten."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.ingest import ingest
from tasks.settings import UserError
from tasks.validate import validate
from tests.conftest import ROOT, parse, real_slice, small_params


def csv(frame, **kw) -> bytes:
    return frame.to_csv(index=False, **kw).encode()


def with_values(column, rows, values):
    frame = real_slice()
    frame[column] = frame[column].astype(object)
    for r, v in zip(rows, values):
        frame.loc[r, column] = v
    return csv(frame)


def keyed(duplicate: bool) -> bytes:
    frame = real_slice()
    frame.insert(0, "block_id", np.arange(len(frame)))
    if duplicate:
        frame.loc[[10, 11], "block_id"] = 7
    return csv(frame)


TRUNCATED = csv(real_slice())[:-25]

# (name, file content or None for a missing path, stage that stops, words the message must hold)
CASES = [
    ("empty file", b"", "ingest", "is empty"),
    ("header only", csv(real_slice().head(0)), "ingest", "has a header but no data rows"),
    ("missing column", csv(real_slice().drop(columns="AveOccup")), "validate", "missing ['AveOccup']"),
    ("extra column", csv(real_slice().assign(note="x")), "validate", "unexpected ['note']"),
    (
        "columns reordered",
        csv(real_slice()[["HouseAge", "MedInc"] + list(real_slice().columns[2:])]),
        "validate",
        "in another order: expected ['MedInc', 'HouseAge'",
    ),
    (
        "strings in a numeric column",
        with_values("HouseAge", [4, 9], ["twelve", "old"]),
        "validate",
        "column HouseAge should be float but holds 2 values that are not numbers, e.g. row 4: 'twelve', row 9: 'old'",
    ),
    (
        "NaN and ±inf",
        with_values("MedInc", [1, 2, 3], [np.nan, np.inf, -np.inf]),
        "validate",
        "column MedInc: 1 rows (0.05%) unexpected, e.g. row 1",
    ),
    (
        "out-of-range values",
        with_values("Latitude", [5], [99.0]),
        "validate",
        "expect_column_values_to_be_between column Latitude: 1 rows (0.05%) unexpected, e.g. row 5: 99.0",
    ),
    (
        "duplicate keys",
        keyed(duplicate=True),
        "validate",
        "expect_column_values_to_be_unique column block_id: 3 rows (0.15%) unexpected, e.g. row 7: 7, row 10: 7, row 11: 7",
    ),
    ("truncated CSV", TRUNCATED, "ingest", "looks truncated: its last line has"),
    ("corrupt Parquet", b"PAR1" + b"\x00garbage" * 50, "ingest", "is a corrupt or truncated Parquet file"),
    ("non-UTF-8 CSV", real_slice().to_csv(index=False).encode("utf-16"), "ingest", "is not a UTF-8 CSV (byte 0xff at offset 0)"),
    ("wrong delimiter", csv(real_slice(), sep=";"), "ingest", "no comma in its header line; it looks ';'-separated"),
    ("not tabular", b"This is a README and not a table.\nIt has prose only.\n", "ingest", "no comma in its header line"),
    ("path does not exist", None, "ingest", "does not exist; set dataset.source"),
]


def keyed_suite(root: Path) -> Path:
    suite = yaml.safe_load((ROOT / "data/suites/california_housing.yaml").read_text())
    suite["columns"] = {"block_id": {"type": "int", "unique": True}, **suite["columns"]}
    path = root / "keyed.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def settings_for(root: Path, content: bytes | None, keyed_suite_file: bool = False, raw_out: str | None = None):
    root.mkdir(parents=True, exist_ok=True)
    source = root / "input.data"
    if content is not None:
        source.write_bytes(content)
    raw = small_params(root, source)
    if keyed_suite_file:
        raw["dataset"]["suite"] = str(keyed_suite(root))
    if raw_out:
        raw["ingest"]["out"] = raw_out
    return parse(raw)


@pytest.mark.parametrize("name,content,stage,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_nothing_is_overwritten(tmp_path, name, content, stage, expected):
    with_key = name == "duplicate keys"
    good = settings_for(tmp_path / "good", keyed(False) if with_key else csv(real_slice()), with_key)
    ingest(good)
    validate(good)  # the good file passes the same suite
    before = Path(good.ingest.out).read_bytes()
    bad = settings_for(tmp_path / "bad", content, with_key, raw_out=good.ingest.out)
    with pytest.raises(UserError) as e:
        ingest(bad)
        validate(bad)
    assert expected in str(e.value)
    if stage == "ingest":  # refused before anything was written
        assert Path(good.ingest.out).read_bytes() == before
    else:  # the report says why, and preprocess will refuse the data
        assert json.loads(Path(bad.validate_.report).read_text())["success"] is False
        assert bad.validate_.report in str(e.value)


@pytest.mark.parametrize("stage,case", [("ingest", "empty file"), ("validate", "missing column")])
def test_the_cli_exits_2_with_one_message(tmp_path, stage, case):
    content = next(c[1] for c in CASES if c[0] == case)
    s = settings_for(tmp_path, content)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(s.model_dump(by_alias=True), sort_keys=False))
    if stage == "validate":
        ingest(s)
    proc = subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DO_NOT_TRACK": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
