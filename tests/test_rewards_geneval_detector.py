"""GenEval detector path: tiny random Mask2Former + CLIP from disk, the server module and its client.

The random models detect garbage; these tests check that the pipeline runs, that shapes and types are right,
that the thresholds are really applied to what the detector returns, and that the remote path gives the same
answers as the in-process one.
"""

import base64
import io
import json
import pickle
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from rewards import RewardError, build_reward
from rewards.geneval_client import GenEvalClient
from rewards.geneval_detector import ClipColourClassifier, GenEvalScorer, load_scorer
from rewards.geneval_rules import COCO_CLASSES, COLORS, Detection
from rewards.geneval_server import make_server
from rewards.geneval_wire import WireError, decode_request, encode_request
from rewards.tiny_models import save_tiny_clip, save_tiny_mask2former

META = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
    {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]},
    {
        "tag": "color_attr",
        "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}],
    },
    {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    },
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_geneval")
    return str(save_tiny_mask2former(root / "m2f")), str(save_tiny_clip(root / "clip"))


@pytest.fixture(scope="module")
def scorer(model_dirs):
    return load_scorer(*model_dirs, device="cpu")


def images(sizes=((96, 80), (64, 64), (120, 72), (80, 96))):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_reward_runs_end_to_end(model_dirs):
    reward = build_reward(
        "geneval", backend="local", detector=model_dirs[0], clip=model_dirs[1], device="cpu", batch_size=3
    )
    out = reward(images(), [""] * 4, META)
    assert out.scores.shape == (4,) and out.scores.dtype == np.float32
    assert set(out.details) == {"correct", "strict_correct", "partial", "num_objects"}
    assert np.all((0 <= out.scores) & (out.scores <= 1))
    np.testing.assert_array_equal(out.scores, out.details["partial"])
    assert np.all(out.details["strict_correct"] <= out.details["correct"])  # strict implies official
    with pytest.raises(RewardError, match="needs GenEval metadata"):
        reward(images()[:1], ["a dog"], [{}])


def test_detections_have_the_right_shapes(scorer):
    scorer.detector.min_score = 0.0  # keep everything the random model proposes
    try:
        batch = images()
        dets = scorer.detector.detect(batch)
    finally:
        scorer.detector.min_score = 0.3
    assert len(dets) == len(batch)
    for image, per_image in zip(batch, dets):
        assert per_image, "top-k with min_score=0 should propose objects"
        for d in per_image:
            assert isinstance(d, Detection) and d.class_name in COCO_CLASSES
            assert 0.0 <= d.score <= 1.0
            assert d.mask.shape == (image.height, image.width) and d.mask.dtype == bool and d.mask.any()
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            ys, xs = np.nonzero(d.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_thresholds_are_applied_to_detector_output(scorer):
    scorer.detector.min_score = 0.0
    try:
        batch = images()
        raw = scorer.detector.detect(batch)
        scores = np.array([d.score for per in raw for d in per])
        low, high = np.quantile(scores, [0.5, 0.9])
        strict_scorer = GenEvalScorer(scorer.detector, scorer.colours, threshold=low, counting_threshold=high)
        results = strict_scorer.score(batch, META)
    finally:
        scorer.detector.min_score = 0.3
    for per, meta, result in zip(raw, META, results):
        cut = high if meta["tag"] == "counting" else low
        expected = {}
        for d in per:
            if d.score >= cut:
                expected[d.class_name] = min(16, expected.get(d.class_name, 0) + 1)
        assert result.counts == expected
    assert sum(sum(r.counts.values()) for r in results) > 0  # the split is not trivial
    # With GenEval's defaults a random model's scores never reach 0.3: nothing is kept, nothing is correct.
    default = scorer.score(batch, META)
    assert all(not r.correct and r.counts == {} for r in default)


def test_colour_crop_and_classification(scorer):
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:20] = True
    d = Detection("car", 0.9, (8, 4, 24, 20), mask)
    crop = np.asarray(ClipColourClassifier.crop(image, d))
    assert crop.shape == (16, 16, 3)
    assert tuple(crop[0, 0]) == (153, 153, 153)  # outside the mask: grey
    assert tuple(crop[5, 5]) == (255, 0, 0)  # inside: the object's pixels
    colours = scorer.colours.classify(image, "car", [d, Detection("car", 0.5, (0, 0, 40, 30))])
    assert len(colours) == 2 and set(colours) <= set(COLORS)


def test_wire_format_is_png_and_json_only():
    img = Image.new("RGB", (6, 4), (1, 2, 3))
    decoded, meta = decode_request(encode_request([img], [META[0]]))
    assert np.array_equal(np.asarray(decoded[0]), np.asarray(img)) and meta == [META[0]]
    jpeg = io.BytesIO()
    img.save(jpeg, format="JPEG")
    body = json.dumps({"version": 1, "images": [base64.b64encode(jpeg.getvalue()).decode()], "metadata": [{}]})
    with pytest.raises(WireError, match="not a PNG"):
        decode_request(body.encode())
    with pytest.raises(WireError, match="not JSON"):
        decode_request(pickle.dumps({"images": []}))


@pytest.fixture()
def server(scorer):
    srv = make_server(scorer, "127.0.0.1", 0, description="tiny")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_client_matches_in_process_scorer(server, scorer):
    batch = images()
    remote = build_reward("geneval", url=server.url, batch_size=3)
    local_results = scorer.score(batch, META)
    out = remote(batch, [""] * 4, META)
    assert out.scores.tolist() == pytest.approx([r.score for r in local_results])
    assert out.details["correct"].tolist() == [float(r.correct) for r in local_results]
    assert GenEvalClient(server.url).health()["status"] == "ok"


def test_server_rejects_bad_requests_without_retrying(server):
    request = urllib.request.Request(server.url + "/score", data=pickle.dumps([1]), method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400 and "not JSON" in json.loads(info.value.read())["error"]
    client = GenEvalClient(server.url, retries=5, backoff=30)  # a retry would make this test hang for minutes
    with pytest.raises(RewardError, match="rejected the request \\(400\\).*include"):
        client._post(encode_request([Image.new("RGB", (4, 4))], [{"tag": "single_object"}]))


def test_client_retries_server_errors_then_succeeds(scorer):
    class Flaky:
        calls = 0

        def score(self, imgs, meta):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("CUDA hiccup")
            return scorer.score(imgs, meta)

    srv = make_server(Flaky(), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        results = GenEvalClient(srv.url, retries=2, backoff=0.01).score(images()[:1], META[:1])
        assert len(results) == 1 and Flaky.calls == 2
    finally:
        srv.shutdown()
        srv.server_close()


def test_client_gives_up_with_a_clear_message():
    client = GenEvalClient("http://127.0.0.1:9", timeout=2, retries=2, backoff=0.01)
    with pytest.raises(RewardError, match="failed after 3 attempts.*python -m rewards.geneval_server"):
        client.score([Image.new("RGB", (4, 4))], META[:1])


def test_server_module_cli(model_dirs):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rewards.geneval_server",
            "--port",
            "0",
            "--detector",
            model_dirs[0],
            "--clip",
            model_dirs[1],
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("GenEval server listening on http://127.0.0.1:"), proc.stderr.read()
        url = line.split()[-1]
        reward = build_reward("geneval", url=url, retries=0)
        out = reward(images()[:2], ["", ""], META[:2])
        assert out.scores.shape == (2,)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0  # SIGTERM shuts the server down cleanly


def test_server_cli_reports_missing_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rewards.geneval_server", "--detector", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
