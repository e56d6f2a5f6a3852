"""OCR reward: the text rule, the missing-quote policies, and real PP-OCR (rapidocr ONNX) on rendered text."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from rewards import RewardError, build_reward
from rewards.ocr import OcrReward, extract_target, levenshtein, normalise, ocr_distance, ocr_score


def render(text: str, size: int = 512) -> Image.Image:
    """Big black text on white; Pillow's scalable default font, so no system font is needed."""
    image = Image.new("RGB", (size, size), "white")
    font = ImageFont.load_default(size=56)
    ImageDraw.Draw(image).text((24, size // 2 - 30), text, font=font, fill="black")
    return image


class FakeBackend:
    name = "fake"

    def __init__(self, texts):
        self.texts = list(texts)
        self.batches = []

    def read(self, images):
        self.batches.append(len(images))
        return [self.texts.pop(0) for _ in images]


def test_target_is_first_quoted_text():
    assert extract_target('A sign that says "Open Late" and "Closed"') == "Open Late"
    assert extract_target("A sign \u201cHello\u201d") == "Hello"
    assert extract_target("no quotes here") is None
    # as the reference's prompt.split('"')[1]: an unmatched quote takes the rest of the prompt
    assert extract_target('A neon sign "OPEN 24 hours') == "OPEN 24 hours"
    assert extract_target('A sign \u201cHi\u201d under a "Bar" sign') == "Bar"  # the ASCII quote wins, as published


def test_only_spaces_are_removed_as_in_the_reference_unless_asked():
    assert normalise(" Open\tLate \n") == "open\tlate\n"
    assert normalise(" Open\tLate \n", whitespace="all") == "openlate"
    assert ocr_score("Open Late", "open\nlate") == pytest.approx(1 - 1 / 8)  # the newline costs one edit
    assert ocr_score("Open Late", "open\nlate", whitespace="all") == 1.0
    with pytest.raises(RewardError, match="whitespace"):
        OcrReward(FakeBackend([]), whitespace="tabs")


def test_normalise_and_distance_rules():
    assert normalise(" Open Late ") == "openlate"
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_distance("Open Late", "WE ARE OPENLATE TODAY") == 0  # substring after normalisation
    assert ocr_distance("cat", "cut") == 1
    assert ocr_distance("cat", "a completely different sentence") == 3  # capped at len(target)
    assert ocr_score("Hello World", "hello word") == pytest.approx(1 - 1 / 10)
    assert ocr_score("abc", "") == 0.0


def test_missing_quotes_policies():
    images = [Image.new("RGB", (8, 8))] * 2
    prompts = ['a sign "hi"', "no quotes"]
    with pytest.raises(RewardError, match=r"prompt 1 has no text between double quotes.*on_missing"):
        OcrReward(FakeBackend(["hi"]), on_missing="error")(images, prompts)
    zero = OcrReward(FakeBackend(["hi"]), on_missing="zero")(images, prompts)
    assert zero.scores.tolist() == [1.0, 0.0]
    skipped = OcrReward(FakeBackend(["hi"]), on_missing="skip-nan")(images, prompts)
    assert skipped.scores[0] == 1.0 and np.isnan(skipped.scores[1]) and np.isnan(skipped.details["distance"][1])
    with pytest.raises(RewardError, match="on_missing"):
        OcrReward(FakeBackend([]), on_missing="ignore")


def test_batches_and_details():
    backend = FakeBackend(["abc", "xbc", "zzz", "abc", "abc"])
    out = OcrReward(backend, batch_size=2)([Image.new("RGB", (8, 8))] * 5, ['"abc"'] * 5)
    assert backend.batches == [2, 2, 1]
    assert out.scores.tolist() == pytest.approx([1, 2 / 3, 0, 1, 1])
    assert out.details["distance"].tolist() == [0, 1, 3, 0, 0]
    assert out.details["exact"].tolist() == [1, 0, 0, 1, 1]


class FlakyBackend(FakeBackend):
    """Raises on any batch holding the image marked bad."""

    def __init__(self, texts, bad):
        super().__init__(texts)
        self.bad = bad

    def read(self, images):
        if any(im is self.bad for im in images):
            raise RuntimeError("det model returned no boxes tensor")
        return super().read(images)


def test_an_engine_error_scores_that_image_zero_and_is_counted(caplog):
    good, bad = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))
    reward = OcrReward(FlakyBackend(["abc", "abc"], bad), batch_size=4)
    with caplog.at_level("WARNING", logger="rewards.ocr"):
        out = reward([good, bad, good], ['"abc"'] * 3)
    assert out.scores.tolist() == [1.0, 0.0, 1.0]
    assert out.details["engine_error"].tolist() == [0.0, 1.0, 0.0] and np.isnan(out.details["distance"][1])
    assert reward.engine_errors == 1 and "failed on image 1" in caplog.text


def test_engine_gets_the_rgb_array_as_published_or_bgr_on_request():
    from rewards.ocr import engine_array

    image = Image.new("RGB", (2, 2), (255, 0, 0))
    assert engine_array(image)[0, 0].tolist() == [255, 0, 0]  # the reference passes np.array(pil_image)
    assert engine_array(image, "bgr")[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(RewardError, match="engine_input"):
        engine_array(image, "rbg")


@pytest.fixture(scope="module")
def real_ocr():
    return build_reward("ocr", backend="rapidocr", batch_size=4)


def test_real_ocr_reads_rendered_text(real_ocr):
    images = [render("OPEN LATE"), render("Hello World"), render("CLOSED"), Image.new("RGB", (512, 512), "white")]
    prompts = [
        'A sign that says "Open Late"',
        'A poster reading "Hello Word"',
        'A sign that says "OPEN"',
        'A blank wall with "Nothing"',
    ]
    out = real_ocr(images, prompts)
    assert out.scores[0] == 1.0  # exact match (case and spaces ignored)
    assert 0.0 < out.scores[1] < 1.0  # one wrong letter
    assert out.scores[1] == pytest.approx(1 - 1 / 9)
    assert out.scores[2] < 1.0  # different word
    assert out.scores[3] == 0.0  # nothing to read
    assert out.scores.dtype == np.float32 and out.scores.shape == (4,)
