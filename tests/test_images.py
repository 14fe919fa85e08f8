"""Images (dataset.modality: image) end to end on a real slice of Fashion-MNIST (the IDX files of the Debian package
dataset-fashion-mnist): sources, validation with quarantine, uint8 shards, the streaming loader, 2 ranks = 1
process, exact resume, bounded memory, evaluation's figures, the ONNX package on uint8 pixels, batch prediction
with rejects, and the image settings' refusals."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from tasks.evaluate import evaluate
from tasks.images.decode import encode_png
from tasks.images.sources import read_idx
from tasks.ingest import ingest
from tasks.package import package
from tasks.preprocess import preprocess
from tasks.settings import Settings, UserError
from tasks.train import train
from tasks.validate import validate
from tests.conftest import ROOT, cli_root, parse, same_parameters, small_params, variant

FMNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install -y dataset-fashion-mnist (.ci/run does)
if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
    pytest.skip(f"Fashion-MNIST is not installed in {FMNIST}: apt-get install -y dataset-fashion-mnist", allow_module_level=True)
SHIPPED = yaml.safe_load((ROOT / "data/datasets/fashion_mnist.yaml").read_text())["dataset"]


def fmnist(n: int, part: str = "train", start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n real images (uint8 28×28) and their labels (0-9) of the train or t10k files."""
    images = read_idx((FMNIST / f"{part}-images-idx3-ubyte.gz").read_bytes(), "images", 3)
    labels = read_idx((FMNIST / f"{part}-labels-idx1-ubyte.gz").read_bytes(), "labels", 1)
    return images[start : start + n], labels[start : start + n]


def class_dir(root: Path, n: int, start: int = 0) -> Path:
    """A class-subfolder directory root/<label>/<n>.png of n real images."""
    for i, (x, y) in enumerate(zip(*fmnist(n, start=start))):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        (root / str(y) / f"{start + i:05d}.png").write_bytes(encode_png(x))
    return root


def digits_suite(root: Path, **image) -> Path:
    """The shipped suite with the labels a class-folder slice has (0-9: folder names cannot hold 'T-shirt/top')."""
    suite = yaml.safe_load((ROOT / SHIPPED["suite"]).read_text())
    suite.update(labels=[str(i) for i in range(10)], row_count={"min": 10, "max": 10_000_000})
    suite["image"].update(image)
    path = root / "suite.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(suite))
    return path


def image_params(root: Path, source: Path, suite: Path | None = None, **overrides) -> dict:
    """params.yaml for an image workspace under `root`: the shipped dataset on `source`, a small cnn."""
    raw = small_params(root, source)
    raw["dataset"] = copy.deepcopy(SHIPPED) | {"source": str(source), "sha256": None, "suite": str(suite or digits_suite(root))}
    raw["dataset"]["image"].update(split="hash", names=[], shard_rows=128)
    raw["evaluate"]["primary"] = "accuracy"
    raw["train"].update(model="cnn", hidden=[8, 16], epochs=2, batch_size=64, lr=0.01, dropout=0.0)
    for dotted, value in overrides.items():
        *path, last = dotted.split("__")
        node = raw
        for p in path:
            node = node[p]
        node[last] = value
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def image_workspace(root: Path, n: int = 600, **overrides) -> Settings:
    root.mkdir(parents=True, exist_ok=True)
    return parse(image_params(root, class_dir(root / "images", n), **overrides))


def to_preprocess(s: Settings) -> dict:
    ingest(s)
    validate(s)
    return preprocess(s)


@pytest.fixture(scope="session")
def img_features(tmp_path_factory) -> Settings:
    """600 real images through ingest, validate and preprocess (shards of at most 128 images)."""
    s = image_workspace(tmp_path_factory.mktemp("img_features"))
    to_preprocess(s)
    return s


@pytest.fixture(scope="session")
def img_packaged(img_features, tmp_path_factory):
    """img_features trained (cnn, crop_flip, 6 epochs), evaluated and packaged."""
    root = tmp_path_factory.mktemp("img_packaged")
    s = variant(img_features, root, epochs=6, patience=6, augment="crop_flip")
    raw = s.model_dump(by_alias=True)
    raw["package"].update(out_dir=str(root / "package"), archive=str(root / "package.tar.gz"))
    raw["evaluate"]["champion"] = str(root / "production")
    s = parse(raw)
    summary = train(s)
    return s, summary, evaluate(s), package(s)


def stage_cli(s: Settings, module: str) -> subprocess.CompletedProcess:
    cwd = cli_root(s)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def idx_file(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def decoded(raw: Path, label_of=str) -> list[tuple[str, str]]:
    """(label, sha256 of the decoded pixels) of every image of a raw table, sorted."""
    table = pq.read_table(raw)
    pixels = [
        hashlib.sha256(np.asarray(Image.open(io.BytesIO(b))).tobytes()).hexdigest() for b in table.column("image").to_pylist()
    ]
    return sorted(zip(map(label_of, table.column("label").to_pylist()), pixels))


# sources ------------------------------------------------------------------------------------------------


def test_a_class_directory_a_parquet_table_and_idx_files_give_the_same_images(tmp_path):
    from tasks.files import sha256_path

    x, y = fmnist(300)
    folder = class_dir(tmp_path / "folder", 300)
    table = tmp_path / "table.parquet"
    pd.DataFrame({"image": [encode_png(a) for a in x], "label": y.astype(np.int64)}).to_parquet(table)
    idx = tmp_path / "idx"
    idx.mkdir()
    idx_file(idx / "train-images-idx3-ubyte.gz", x[:250])
    idx_file(idx / "train-labels-idx1-ubyte.gz", y[:250])
    idx_file(idx / "t10k-images-idx3-ubyte.gz", x[250:])
    idx_file(idx / "t10k-labels-idx1-ubyte.gz", y[250:])
    names = SHIPPED["image"]["names"]
    got = {}
    for name, source, extra in [
        ("folder", folder, {}),
        ("table", table, {}),
        ("idx", idx, {"dataset__image__names": names, "dataset__image__split": "source"}),
    ]:
        s = parse(image_params(tmp_path / f"ws_{name}", source, digits_suite(tmp_path / f"ws_{name}"), **extra))
        out = ingest(s)
        assert out["rows"] == 300
        got[name] = decoded(Path(s.ingest.out), label_of=(lambda v: str(names.index(v))) if name == "idx" else str)
        if name == "folder":  # a directory's sha256 is tasks/files.sha256_path's, as for tables
            assert out["sha256"] == sha256_path(folder)
        if name == "idx":  # the t10k files are the source's test split; labels got their names
            raw = pq.read_table(s.ingest.out).to_pandas()
            assert raw.split.value_counts().to_dict() == {"train": 250, "test": 50}
            assert set(raw.label) <= set(names)
    assert got["folder"] == got["table"] == got["idx"]
    with pytest.raises(UserError, match=r"dataset.sha256: .* has sha256 [0-9a-f]{64}, expected 0{64}; the data changed"):
        ingest(parse(image_params(tmp_path / "ws_sha", folder, digits_suite(tmp_path), dataset__sha256="0" * 64)))


def test_the_shipped_fashion_mnist_source_is_checked_by_its_sha256():
    """data/datasets/fashion_mnist.yaml's sha256 is that of the installed IDX files (their directory)."""
    from tasks.files import sha256_path

    assert sha256_path(SHIPPED["source"]) == SHIPPED["sha256"]


def test_an_empty_class_folder_is_refused_in_one_line_and_nothing_is_overwritten(tmp_path):
    s = image_workspace(tmp_path, n=100)
    ingest(s)
    before = Path(s.ingest.out).read_bytes()
    (tmp_path / "images" / "10").mkdir()
    proc = stage_cli(s, "tasks.ingest")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: dataset.source: class folder ")
    assert "images/10 is empty (1 empty in all); every class needs images: add them, or remove the folder" in proc.stderr
    assert Path(s.ingest.out).read_bytes() == before


# validation ---------------------------------------------------------------------------------------------


def bad_images(folder: Path) -> dict[str, str]:
    """Five broken images added to a class folder: what each is, by path."""
    good = (folder / "0").iterdir().__next__().read_bytes()
    (folder / "0" / "corrupt.png").write_bytes(b"this is not an image" * 10)
    (folder / "0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "1" / "big.png").write_bytes(encode_png(np.zeros((32, 32), np.uint8)))
    (folder / "2" / "rgb.png").write_bytes(encode_png(np.zeros((28, 28, 3), np.uint8)))
    (folder / "11").mkdir()
    (folder / "11" / "stray.png").write_bytes(good)
    return {
        "0/corrupt.png": "image: expect_image_to_decode (not an image Pillow can decode)",
        "0/truncated.png": "image: expect_image_to_decode (cannot be decoded (image file is truncated",
        "1/big.png": "image: expect_image_size_to_be_between (width 32, not between 28 and 28); image: "
        "expect_image_size_to_be_between (height 32",
        "2/rgb.png": "image: expect_image_channels_to_be_in_set (3 channels (RGB), not one of [1])",
        "11/stray.png": "label: expect_column_values_to_be_in_set (label '11' is not in the suite's labels)",
    }


def test_bad_images_stop_validation_in_one_line_naming_a_file_and_nothing_is_overwritten(tmp_path):
    s = image_workspace(tmp_path, n=200)
    ingest(s)
    validate(s)
    kept = {p: Path(p).read_bytes() for p in (s.validate_.out, s.validate_.quarantine, s.validate_.reference)}
    bad_images(tmp_path / "images")
    ingest(s)
    proc = stage_cli(s, "tasks.validate")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line
    assert proc.stderr.startswith(f"error: validate: 5 of 205 images of {s.ingest.out} fail ")
    assert "2 × expect_image_to_decode (e.g. 0/corrupt.png: not an image Pillow can decode)" in proc.stderr
    assert "1 × expect_image_channels_to_be_in_set (e.g. 2/rgb.png: 3 channels (RGB), not one of [1])" in proc.stderr
    assert "1 × expect_column_values_to_be_in_set (e.g. 11/stray.png: label '11' is not in the suite's labels)" in proc.stderr
    assert "set validate.on_failure: quarantine to set them aside" in proc.stderr
    assert {p: Path(p).read_bytes() for p in kept} == kept
    report = json.loads(Path(s.validate_.report).read_text())
    assert report["success"] is False and report["rows"] == {"input": 205, "clean": 205, "quarantined": 0}
    assert "| FAIL | expect_image_to_decode | image |" in Path(s.validate_.report_md).read_text()


def test_bad_images_are_quarantined_with_their_reasons(tmp_path):
    s = image_workspace(tmp_path, n=200, validate__on_failure="quarantine", validate__min_clean_fraction=0.9)
    expected = bad_images(tmp_path / "images")
    ingest(s)
    out = validate(s)
    assert out["success"] and out["rows"] == {"input": 205, "clean": 200, "quarantined": 5}
    q = pq.read_table(s.validate_.quarantine).to_pandas().set_index("path")
    assert sorted(q.index) == sorted(expected)
    for path, reason in expected.items():
        assert q.loc[path, "_reason"].startswith(reason), (path, q.loc[path, "_reason"])
    assert pq.read_metadata(s.validate_.out).num_rows == 200
    schema = preprocess(s)  # the clean images go on
    assert sum(schema["rows"].values()) == 200 and schema["classes"] == [str(i) for i in range(10)]


def test_class_balance_is_checked_against_the_reference(tmp_path):
    s = image_workspace(tmp_path, n=400)
    ingest(s)
    validate(s)  # the reference: Fashion-MNIST's balanced classes
    for path in sorted((tmp_path / "images" / "3").iterdir())[1:]:
        path.unlink()  # class 3 almost gone: 1 image of ~360 instead of 1 in 10
    ingest(s)
    with pytest.raises(UserError, match=r"the class balance of .* drifted .*: PSI \d\.\d+ \(max validate.drift_max_psi=0.25\)"):
        validate(s)
    raw = s.model_dump(by_alias=True)
    raw["validate"]["drift"] = "warn"
    assert validate(parse(raw))["drift"]["label"]["psi"] > 0.25  # accepted, and the new reference


# preprocessing --------------------------------------------------------------------------------------------


def test_shards_are_uint8_with_the_train_statistics_and_a_stable_split(img_features, tmp_path):
    out = Path(img_features.preprocess.out_dir)
    schema = json.loads((out / "schema.json").read_text())
    transform = json.loads((out / "transform.json").read_text())
    assert sum(schema["rows"].values()) == 600 and schema["image"]["size"] == [28, 28]
    train = [np.load(out / e["images"]) for e in schema["shards"]["train"]]
    assert all(a.dtype == np.uint8 and a.shape[1:] == (1, 28, 28) and len(a) <= 128 for a in train)
    pixels = np.concatenate(train).astype(np.float64) / 255
    assert transform["image"]["mean"] == pytest.approx([pixels.mean()], abs=1e-9)
    assert transform["image"]["std"] == pytest.approx([pixels.std()], abs=1e-9)
    labels = np.concatenate([np.load(out / e["labels"]) for e in schema["shards"]["train"]])
    assert np.bincount(labels, minlength=10).tolist() == schema["class_rows"]["train"]
    raw_test = pd.read_parquet(out / "test_raw")
    assert len(raw_test) == schema["rows"]["test"] and set(raw_test.columns) >= {"image", "label", "path"}
    # the split is a function of each image's bytes: a rerun on a shuffled copy of the data puts every image where it was
    raw = img_features.model_dump(by_alias=True)
    raw["preprocess"]["out_dir"] = str(tmp_path / "again")
    table = pq.read_table(img_features.validate_.out)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    pq.write_table(shuffled, tmp_path / "shuffled.parquet", row_group_size=100)
    raw["validate"]["out"] = str(tmp_path / "shuffled.parquet")
    assert preprocess_on(parse(raw), img_features)["rows"] == schema["rows"]
    assert split_members(tmp_path / "again") == split_members(out)


def split_members(feat: Path) -> dict[str, list[str]]:
    """Per split, the sorted sha256 of each image's pixels in its shards."""
    schema = json.loads((feat / "schema.json").read_text())
    return {
        split: sorted(
            hashlib.sha256(a.tobytes()).hexdigest() for e in schema["shards"][split] for a in np.load(feat / e["images"])
        )
        for split in ("train", "val", "test")
    }


def preprocess_on(s: Settings, validated: Settings) -> dict:
    """preprocess `s`, whose validate.out is a copy of `validated`'s (the validation report says so)."""
    from tasks.files import sha256_path

    report = json.loads(Path(validated.validate_.report).read_text())
    report["validated"] = {"path": s.validate_.out, "sha256": sha256_path(s.validate_.out)}
    Path(s.validate_.report).parent.mkdir(parents=True, exist_ok=True)
    raw = s.model_dump(by_alias=True)
    raw["validate"]["report"] = str(Path(s.preprocess.out_dir).parent / "report.json")
    Path(raw["validate"]["report"]).write_text(json.dumps(report))
    return preprocess(parse(raw))


# training ---------------------------------------------------------------------------------------------


def big_shards(feat: Path, root: Path, times: int) -> Path:
    """A preprocess output whose train split is the slice's train shards listed `times` times (a larger dataset)."""
    root.mkdir(parents=True, exist_ok=True)
    schema = json.loads((feat / "schema.json").read_text())
    for split in ("train", "val"):
        entries = schema["shards"][split] * (times if split == "train" else 1)
        schema["shards"][split] = [{k: str(feat / v) if k != "rows" else v for k, v in e.items()} for e in entries]
    (root / "schema.json").write_text(json.dumps(schema))
    (root / "transform.json").write_bytes((feat / "transform.json").read_bytes())
    return root


def test_the_loader_reads_the_rows_the_loop_asks_for_on_any_rank_from_any_step(img_features):
    from tasks.images.loader import ImageData
    from tasks.training.data import rank_slice
    from tasks.training.objective import objective_for

    feat = Path(img_features.preprocess.out_dir)
    schema, transform = (json.loads((feat / f).read_text()) for f in ("schema.json", "transform.json"))
    images = torch.from_numpy(np.concatenate([np.load(feat / e["images"]) for e in schema["shards"]["train"]]))
    labels = torch.from_numpy(np.concatenate([np.load(feat / e["labels"]) for e in schema["shards"]["train"]]))
    cfg = img_features.train.model_copy(update={"batch_size": 50})
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    for world, skip in [(1, 0), (2, 0), (2, 3)]:  # skip: a run resumed at step 3 of the epoch
        val_rows = []
        for rank in range(world):
            data = ImageData(feat, torch.device("cpu"), objective_for(transform), rank, world, cfg)
            data.start_epoch(perm, 1, skip)
            for start in range(skip * 50, len(perm), 50):
                part = rank_slice(perm[start : start + 50], rank, world)
                x, y = data.train_batch(part)
                assert torch.equal(x, images[part]) and torch.equal(y, labels[part])
            val_rows += [len(y) for _, y in data.val_batches(rank, world)]
            data.close()
        assert sum(val_rows) == schema["rows"]["val"]  # each validation image scored once, by one rank


def test_the_loader_streams_a_dataset_in_the_memory_of_a_few_batches(img_features, tmp_path):
    """Twenty times the slice's train split (~5.6 MB of pixels) read through one epoch: numpy never holds more
    than the batches in flight (tracemalloc sees numpy's allocations)."""
    import tracemalloc

    from tasks.images.loader import ImageData
    from tasks.training.objective import objective_for

    feat = big_shards(Path(img_features.preprocess.out_dir), tmp_path, times=20)
    transform = json.loads((feat / "transform.json").read_text())
    cfg = img_features.train.model_copy(update={"batch_size": 32})
    data = ImageData(feat, torch.device("cpu"), objective_for(transform), 0, 1, cfg)
    total = data.n_train * 28 * 28
    perm = torch.randperm(data.n_train, generator=torch.Generator().manual_seed(0))
    tracemalloc.start()
    try:
        data.start_epoch(perm, 1, 0)
        seen = sum(len(data.train_batch(perm[i : i + 32])[1]) for i in range(0, data.n_train, 32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        data.close()
    assert seen == data.n_train > 7000
    assert peak < 0.05 * total, (peak, total)  # a few 32-image batches (25 KB each), not the 5.6 MB split


@pytest.mark.slow
@pytest.mark.parametrize("model, strategy, atol", [("cnn", "ddp", 1e-5), ("resnet", "fsdp", 1e-4)])
def test_two_gloo_ranks_train_an_image_model_as_one_process(img_features, tmp_path, model, strategy, atol):
    """Augmentation drawn per global batch and no batch statistics in either family: the same parameters, to
    float32 summation order. A conv's weight gradient sums over every pixel of the batch (64 × 28 × 28 terms that
    mostly cancel): one process and two ranks of 32 images sum in another order, about 1e-5 apart relative to the
    gradient in the resnet's stem (2e-6 in the cnn), and AdamW makes a step of lr's size out of a near-zero
    gradient whatever its rounding; the resnet, with more such sums, is held to 1e-4 (measured 3.7e-5)."""
    run = dict(model=model, hidden=[8, 16], epochs=2, augment="crop_flip", lr=0.002)
    one = train(variant(img_features, tmp_path / "one", world_size=1, **run))
    two = train(variant(img_features, tmp_path / "two", world_size=2, strategy=strategy, **run))
    assert one["steps"] == two["steps"] == 12
    assert one["best_val_accuracy"] == pytest.approx(two["best_val_accuracy"], abs=1e-6)
    same_parameters(tmp_path / "one/model", tmp_path / "two/model", atol=atol)


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_ends_with_the_parameters_of_an_uninterrupted_run(img_features, tmp_path, monkeypatch):
    from tests.harness import fault

    run = dict(world_size=2, epochs=2, augment="crop_flip", checkpoint_every="4 steps")  # 6 steps an epoch
    reference = train(variant(img_features, tmp_path / "ref", **run))
    # from a checkpoint taken 2 steps into epoch 2: the loader starts there, with the same augmentation draws
    mid = tmp_path / "ref/model/checkpoints/step-00000008.pt"
    resumed = train(variant(img_features, tmp_path / "mid", resume_from=str(mid), **run))["resumed_from"]
    assert (resumed["steps"], resumed["epoch"], resumed["step_in_epoch"]) == (8, 2, 2)
    same_parameters(tmp_path / "ref/model", tmp_path / "mid/model", atol=1e-6)
    # rank 1 SIGKILLed at step 11: the group restarts from the newest checkpoint written by then
    for key, value in fault(f"kill:1:11:{tmp_path / 'fired'}").items():
        monkeypatch.setenv(key, value)
    summary = train(variant(img_features, tmp_path / "run", **run))
    assert [(r["kind"], r["cause"]) for r in summary["restarts"]] == [
        ("infrastructure", "rank 1 killed by SIGKILL (out of memory?)")
    ]
    assert summary["resumed_from"]["steps"] in (6, 8)  # (8, unless its write in the background was not done)
    assert summary["steps"] == reference["steps"] == 12
    same_parameters(tmp_path / "ref/model", tmp_path / "run/model", atol=1e-6)


# package and predict --------------------------------------------------------------------------------------


def test_evaluate_scores_the_test_shards_and_draws_the_misclassified_images(img_packaged):
    s, summary, metrics, _ = img_packaged
    assert metrics["n"] == json.loads((Path(s.preprocess.out_dir) / "schema.json").read_text())["rows"]["test"]
    assert metrics["accuracy"] > 0.5 and metrics["promote"] == 1  # ten classes: chance is 0.1
    figures = Path(s.evaluate.out_dir) / "figures"
    assert {"confusion.png", "misclassified.png", "learning_curve.png"} <= {p.name for p in figures.iterdir()}
    assert Image.open(figures / "misclassified.png").size[0] > 600
    card = (Path(s.package.out_dir) / "MODEL_CARD.md").read_text()
    assert "Classifies images" in card and "uint8 pixels (N, C, H, W)" in card


def test_the_onnx_model_takes_uint8_pixels_and_gives_torchs_probabilities(img_packaged):
    import onnxruntime as ort

    from tasks.evaluate import predict as torch_probabilities
    from tasks.images.loader import test_split
    from tasks.training.model import load_model

    s, _, _, packaged = img_packaged
    assert packaged["parity_max_abs_diff"] < 1e-5  # the package's own check against evaluate's predictions.csv
    session = ort.InferenceSession(str(Path(s.package.out_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    (inputs,) = session.get_inputs()
    assert inputs.type == "tensor(uint8)" and inputs.shape[1:] == [1, 28, 28]
    x, _ = test_split(Path(s.preprocess.out_dir))
    model, meta = load_model(Path(s.train.out_dir) / "model.pt")
    got = session.run(None, {inputs.name: x.numpy()})[0]
    np.testing.assert_allclose(got, torch_probabilities(model, meta, x), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1, atol=1e-5)


def test_predict_scores_a_directory_and_rejects_the_images_it_cannot_take_with_reasons(img_packaged, tmp_path):
    from tests.conftest import load_package

    s = img_packaged[0]
    x, _ = fmnist(40, part="t10k")
    folder = tmp_path / "in"
    (folder / "shoes").mkdir(parents=True)
    for i, a in enumerate(x):
        (folder / "shoes" / f"{i:03d}.png").write_bytes(encode_png(a))
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "rgb.png").write_bytes(encode_png(np.zeros((28, 28, 3), np.uint8)))
    Image.fromarray(x[0]).save(folder / "photo.jpg", format="JPEG")
    (folder / ".DS_Store").write_bytes(b"skipped")
    out = tmp_path / "out.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.predict", s.package.archive, str(folder), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    predicted, rejects = pd.read_parquet(out), pd.read_parquet(tmp_path / "out.rejects.parquet")
    assert len(predicted) == 40 and list(predicted.columns) == ["path", "prediction", *[f"p_{c}" for c in range(10)]]
    reasons = dict(zip(rejects["path"], rejects["_reason"]))
    assert sorted(reasons) == ["broken.png", "photo.jpg", "rgb.png"]
    assert reasons["broken.png"] == "expect_image_to_decode: not an image Pillow can decode"
    assert reasons["photo.jpg"] == "expect_image_format_to_be_in_set: format JPEG, not one of ['PNG']"
    assert reasons["rgb.png"] == "expect_image_channels_to_be_in_set: 3 channels (RGB), not one of [1]"
    package = load_package(s.package.archive)
    expected = package.predict(pd.DataFrame({"image": [encode_png(a) for a in x]}))
    np.testing.assert_allclose(predicted.filter(like="p_").to_numpy(), expected, atol=1e-7)
    assert predicted["prediction"].tolist() == package.labels(expected).tolist()
    # the same images as a Parquet table of bytes: the same probabilities, rows named by number
    pd.DataFrame({"image": [encode_png(a) for a in x]}).to_parquet(tmp_path / "table.parquet")
    from tasks.predict import predict_file

    counts = predict_file(s.package.archive, tmp_path / "table.parquet", tmp_path / "t.parquet")
    assert (counts["predicted"], counts["rejected"]) == (40, 0)
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "t.parquet").filter(like="p_").to_numpy(), expected, atol=1e-7)


# settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"train": {"model": "mlp"}},
            "train.model=mlp is a model of table columns; dataset.modality=image: set train.model: cnn or resnet",
        ),
        ({"dataset": {"task": "regression"}}, "dataset.modality=image predicts labels: set dataset.task: multiclass"),
        ({"dataset": {"image": None}}, "dataset.modality=image needs dataset.image (size, channels)"),
        (
            {"dataset": {"columns": {"path": "categorical"}}},
            "dataset.columns lists table columns; images have none: set dataset.columns empty",
        ),
        ({"dataset": {"image": {"channels": 2}}}, "dataset.image.channels"),
    ],
)
def test_image_settings_that_cannot_work_are_refused_naming_the_key(tmp_path, change, message):
    raw = image_params(tmp_path, tmp_path / "images", tmp_path / "suite.yaml")
    for section, values in change.items():
        for k, v in values.items():
            raw[section][k] = raw[section][k] | v if isinstance(v, dict) else v
    with pytest.raises(UserError, match=re.escape(message)):
        parse(raw)


def test_table_settings_refuse_image_models_and_augmentation():
    from tests.conftest import project_params

    for train_change, message in [
        ({"model": "cnn"}, "train.model=cnn is a model of images; dataset.modality=table: set train.model: mlp or resmlp"),
        ({"augment": "crop_flip"}, "train.augment=crop_flip augments images; dataset.modality=table: set train.augment: none"),
    ]:
        raw = project_params()
        raw["train"].update(train_change)
        with pytest.raises(UserError, match=re.escape(message)):
            parse(raw)
