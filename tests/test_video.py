"""The video pipeline on small generated scenes: ground truth, tracking, per-track labels,
MOT output, stream failures, source confinement and adaptive detector selection."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("trackers")

from tinyserve.datasets import load_fashion_mnist  # noqa: E402
from tinyserve.detection import Detections, iou_matrix  # noqa: E402
from tinyserve.errors import ConfigError, Forbidden, InvalidParameter  # noqa: E402
from tinyserve.manifest import InputSpec  # noqa: E402
from tinyserve.scene_data import read_gt  # noqa: E402
from tinyserve.scenes import (  # noqa: E402
    GenerateConfig,
    SceneConfig,
    card_pixels,
    generate,
    new_scene,
)
from tinyserve.selection import Candidate, Selector, choose, measure  # noqa: E402
from tinyserve.tracking import TrackBook, TrackConfig  # noqa: E402
from tinyserve.video_output import mot_lines  # noqa: E402
from tinyserve.video_pipeline import (  # noqa: E402
    ClassifierHandle,
    DetectorHandle,
    StreamPipeline,
)
from tinyserve.video_sources import Decoder, SourcePolicy  # noqa: E402

SMALL = SceneConfig(width=192, height=144, min_objects=2, max_objects=3, min_size=24, max_size=48)


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    generate(
        GenerateConfig(
            out,
            SMALL,
            train_sequences=2,
            train_frames_per_sequence=3,
            test_sequences=2,
            test_frames=60,
        )
    )
    return out


def test_ground_truth_is_what_was_drawn() -> None:
    items = load_fashion_mnist("test")
    clean = SceneConfig(
        width=192, height=144, min_size=24, max_size=48, noise=(0.0, 0.0), blur=False
    )
    scene = new_scene(clean, items, seed=3)
    scene.light_depth = 0.0
    for _ in range(40):
        image, boxes = scene.step()
        covered = np.zeros(image.shape[:2], bool)
        for box in boxes:
            x, y, s = int(box.left), int(box.top), int(box.size)
            covered[max(y, 0) : y + s, max(x, 0) : x + s] = True
        # Outside every box the frame is the background, untouched.
        assert (image[~covered] == scene.background[~covered]).all()
        drawn = {t.id: t for t in scene.tracks}
        for box in boxes:
            if box.visibility < 1.0:
                continue
            x, y, s = int(box.left), int(box.top), int(box.size)
            card = card_pixels(items.images[drawn[box.track].item, :, :, 0], s)
            assert np.array_equal(image[y : y + s, x : x + s, 0], np.round(card).astype(np.uint8))
            assert box.class_id == items.labels[drawn[box.track].item]


def test_generated_sequences_are_mot_challenge(scenes: Path) -> None:
    import av

    seq = scenes / "test" / "scene-01"
    with av.open(str(seq / "video.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = sum(1 for _ in container.decode(stream))
    assert frames == 60
    truth = read_gt(seq / "gt" / "gt.txt")
    assert min(truth) == 1 and max(truth) <= 60
    classes = json.loads((seq / "tracks.json").read_text())
    for rows in truth.values():
        for track, class_id, *_ in rows:
            assert classes[str(track)]["class_id"] == class_id
    assert "frameRate=30" in (seq / "seqinfo.ini").read_text()
    labels = json.loads((scenes / "train" / "labels.json").read_text())
    assert len(labels["frames"]) == 6 and all(
        len(f["boxes"]) == len(f["classes"]) for f in labels["frames"]
    )


def _dets(boxes: list[list[float]], score: float = 0.9) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), score, np.float32), np.zeros(len(b), np.int64))


def test_tracker_keeps_ids_through_motion_and_reports_appear_and_left() -> None:
    book = TrackBook(TrackConfig(lost_frames=5, confirm_frames=2))
    appeared_at, ids = {}, set()
    for f in range(1, 21):
        a = [10 + 3 * f, 10, 40 + 3 * f, 40]
        b = [150 - 2 * f, 80, 180 - 2 * f, 110]
        seen, appeared, gone = book.update(f, _dets([a, b]))
        for t in appeared:
            appeared_at[t.id] = f
        ids |= {t.id for t in seen}
        assert not gone
    assert len(ids) == 2 and all(v == 2 for v in appeared_at.values())  # confirmed on frame 2
    left_at = None
    for f in range(21, 40):
        _, _, gone = book.update(f, _dets([]))
        if gone and left_at is None:
            left_at = f
            assert {t.id for t in gone} == ids
    assert left_at is not None and left_at <= 20 + 5 + 2


def test_mot_lines_format() -> None:
    book = TrackBook()
    book.update(1, _dets([[10.5, 20, 50.5, 70]]))
    seen, _, _ = book.update(2, _dets([[11, 21, 51, 71]]))
    seen[0].label_id = 3
    (line,) = mot_lines(2, seen)
    frame, tid, left, top, w, h, conf, cls, x, y = line.split(",")
    assert (int(frame), int(tid), int(cls), x, y) == (2, seen[0].id, 3, "-1", "-1")
    assert (float(left), float(top), float(w), float(h)) == pytest.approx((11, 21, 40, 50), abs=0.6)
    assert 0 < float(conf) <= 1 and int(tid) >= 1


class GroundTruthDetector:
    """A fake detector that answers each frame with its ground truth (in order)."""

    def __init__(self, gt: Path, width: int, height: int, spec: InputSpec) -> None:
        self.truth = read_gt(gt)
        self.frame = 0
        self.width, self.height = width, height
        self.spec = spec

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        assert pixels.shape == self.spec.shape
        self.frame += 1
        rows = np.zeros((32, 6), np.float32)
        for i, (_, _, x, y, w, h, vis) in enumerate(self.truth.get(self.frame, [])[:32]):
            if vis < 0.3:
                continue
            x1, y1 = max(x, 0) / self.width, max(y, 0) / self.height
            x2, y2 = min(x + w, self.width) / self.width, min(y + h, self.height) / self.height
            rows[i] = (x1, y1, x2, y2, 0.95, 0)
        await asyncio.sleep(0)
        return rows[np.argsort(-rows[:, 4], kind="stable")]


class OneSelector:
    def __init__(self, handle: DetectorHandle) -> None:
        self.handle = handle

    def current(self) -> DetectorHandle:
        return self.handle

    def for_size(self, width: int, height: int) -> DetectorHandle:
        return self.handle


def _pipeline(
    source: str, scenes: Path, classify_calls: list[int], out: list[dict], policy: SourcePolicy
) -> StreamPipeline:
    spec = InputSpec(96, 128, 3, "RGB")
    detector = GroundTruthDetector(scenes / "test" / "scene-01" / "gt" / "gt.txt", 192, 144, spec)
    handle = DetectorHandle("gt", 1, spec, detector, 1.0)

    async def classify(crops: list[np.ndarray]) -> np.ndarray:
        classify_calls.append(len(crops))
        logits = np.zeros((len(crops), 10), np.float32)
        logits[:, 4] = 5.0  # always "Coat"
        return logits

    classifier = ClassifierHandle(
        "fake", 1, InputSpec(28, 28, 1, "L"), tuple("abcdefghij"), classify
    )
    decoder = Decoder(source, (128, 96), policy)
    return StreamPipeline("s", decoder, OneSelector(handle), classifier, on_event=out.append)


def test_tracks_are_classified_on_confirmation_not_every_box(scenes: Path) -> None:
    calls: list[int] = []
    events: list[dict] = []
    video = str(scenes / "test" / "scene-01" / "video.mp4")
    pipeline = _pipeline(video, scenes, calls, events, SourcePolicy(confined=False))
    stats = asyncio.run(pipeline.run())
    assert stats.state == "finished" and stats.frames == 60
    appeared = [e for e in events if e["type"] == "appear"]
    classified = [e for e in events if e["type"] == "classified"]
    left = [e for e in events if e["type"] == "left"]
    assert appeared and len(left) == len(appeared)
    classified_tracks = {e["track"] for e in classified}
    assert classified_tracks <= {e["track"] for e in appeared}
    assert len(classified_tracks) >= len(appeared) / 2  # the others stayed cut or covered
    assert all(e["label"] == "e" and e["class_id"] == 4 for e in classified)
    # A few crops per track, far fewer than the boxes seen.
    assert 0 < sum(calls) < stats.detections / 3
    assert sum(calls) == stats.crops


def test_the_tracks_classifier_is_the_video_one_when_the_repository_has_it(
    tmp_path: Path,
) -> None:
    from tinyserve.repository import ModelConfig
    from tinyserve.video_pipeline import default_classifier

    assert default_classifier({"fashion-cnn", "fashion-cnn-video"}.__contains__) == (
        "fashion-cnn-video"
    )
    assert default_classifier({"fashion-cnn"}.__contains__) == "fashion-cnn"
    bundled = Path(__file__).resolve().parent.parent / "models" / "fashion-cnn-video"
    assert ModelConfig.read(bundled).default_candidate is False
    (tmp_path / "config.toml").write_text('default_candidate = "no"\n')
    with pytest.raises(ConfigError, match="default_candidate"):
        ModelConfig.read(tmp_path)


def test_a_track_never_seen_clearly_is_cropped_after_its_patience() -> None:
    book = TrackBook(TrackConfig(confirm_frames=1, patience=4, patient_occlusion=0.3))
    boxes = [[100, 50, 140, 90], [130, 50, 170, 90]]  # each covers a quarter of the other
    book.update(1, _dets(boxes))
    seen, _, _ = book.update(2, _dets(boxes))
    first = seen[0].first_frame
    for frame in range(2, first + 4):
        seen, _, _ = book.update(frame, _dets(boxes)) if frame > 2 else (seen, [], [])
        assert book.to_classify(frame, seen, 640, 480) == []
    seen, _, _ = book.update(first + 4, _dets(boxes))
    assert len(book.to_classify(first + 4, seen, 640, 480)) == 2  # a partial view beats none


def test_a_broken_stream_fails_alone(scenes: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    os.link(scenes / "test" / "scene-01" / "video.mp4", tmp_path / "good.mp4")
    policy = SourcePolicy(root=tmp_path)
    good = _pipeline("good.mp4", scenes, [], [], policy)
    bad = _pipeline("broken.mp4", scenes, [], [], policy)

    async def both() -> list:
        return await asyncio.gather(good.run(), bad.run())

    good_stats, bad_stats = asyncio.run(both())
    assert bad_stats.state == "failed" and "broken.mp4" in bad_stats.error
    assert good_stats.state == "finished" and good_stats.frames == 60


def test_sources_are_confined(tmp_path: Path) -> None:
    root = tmp_path / "streams"
    root.mkdir()
    (root / "ok.mp4").write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (root / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    policy = SourcePolicy(root=root, allow=("rtsp://cams.example/", "/dev/video0"))
    assert policy.check("ok.mp4")[0] == str(root / "ok.mp4")
    assert policy.check("rtsp://cams.example/door")[1]["protocol_whitelist"].startswith("http")
    refused = [
        "../secret.mp4",
        str(tmp_path / "secret.mp4"),
        "link.mp4",
        "/etc/passwd",
        "file:///etc/passwd",
        "http://elsewhere.example/x.mp4",
        "concat:/etc/passwd|x",
        "/dev/video1",
        "subfile,,start,0,end,0,,:/etc/passwd",
        "",
        "gopher://x/y",
    ]
    for source in refused:
        with pytest.raises((InvalidParameter, Forbidden)):
            policy.check(source)
    assert policy.check("/dev/video0")[2] == "v4l2"
    # FFmpeg itself may read only plain media files, never a playlist naming other files.
    assert policy.check("ok.mp4")[1]["protocol_whitelist"] == "file"
    assert "hls" not in policy.check("ok.mp4")[1]["format_whitelist"].split(",")


def test_a_playlist_inside_the_root_cannot_read_outside(tmp_path: Path, scenes: Path) -> None:
    os.link(scenes / "test" / "scene-01" / "video.mp4", tmp_path / "outside.mp4")
    root = tmp_path / "root"
    root.mkdir()
    (root / "list.m3u8").write_text(f"#EXTM3U\n#EXTINF:2,\nfile://{tmp_path}/outside.mp4\n")
    decoder = Decoder("list.m3u8", (128, 96), SourcePolicy(root=root))
    decoder.start()
    decoder.join(10)
    assert decoder.stats.error and decoder.stats.decoded == 0


def _candidate(key: int, cost: float, acc: float, size: int = 320) -> Candidate:
    async def never(_: np.ndarray) -> np.ndarray:
        raise AssertionError

    spec = InputSpec(size * 3 // 4, size, 3, "RGB")
    return Candidate(DetectorHandle("det", key, spec, never, acc), cost)


def test_choose_most_accurate_that_fits_the_budget() -> None:
    slow = _candidate(1, 0.004, 0.97)  # 4 ms a frame
    fast = _candidate(2, 0.001, 0.95, 256)
    int8 = _candidate(3, 0.002, 0.96)
    cands = [slow, fast, int8]
    assert choose(cands, 1, 30)[0] is slow  # budget 0.35 / 30 = 11.7 ms
    assert choose(cands, 5, 30)[0] is int8  # budget 2.33 ms
    assert choose(cands, 8, 30)[0] is fast  # budget 1.46 ms
    assert choose(cands, 8, 30, headroom=0.5)[0] is int8  # half the machine: 2.08 ms
    chosen, reason = choose(cands, 64, 30)
    assert chosen is fast and "none fits" in reason
    assert choose(cands, 64, None)[0] is slow  # file mode: no budget


def test_selector_steps_down_when_frames_drop() -> None:
    changes: list[str] = []
    selector = Selector(
        [_candidate(1, 0.004, 0.97), _candidate(2, 0.001, 0.95, 256)],
        1,
        30,
        on_change=lambda c, r: changes.append(r),
    )
    assert selector.current().version == 1
    assert not selector.observe(100, 0)
    assert selector.observe(200, 10)  # 10 of 110 frames dropped
    assert selector.current().version == 2 and "dropped" in changes[-1]
    assert selector.for_size(320, 240).version == 1  # frames decoded before the switch
    assert not selector.observe(400, 30)  # nothing cheaper left


def test_measure_times_a_fake_engine_of_known_speed() -> None:
    def infer(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.002 * len(batch))
        return np.zeros((len(batch), 1, 6), np.float32)

    cost = measure(infer, (24, 32, 3), batch=4, runs=3)
    assert 0.0018 < cost < 0.006


def test_detector_output_boxes_are_in_source_pixels() -> None:
    from tinyserve.detection import from_output

    rows = np.array([[0.5, 0.25, 0.75, 0.5, 0.9, 0], [0, 0, 0, 0, 0.0, 0]], np.float32)
    d = from_output(rows, 640, 480, 0.1)
    assert len(d) == 1 and d.boxes[0].tolist() == [320, 120, 480, 240]
    assert iou_matrix(d.boxes, d.boxes)[0, 0] == pytest.approx(1.0)


def test_crops_wait_while_a_box_is_cut_by_the_edge_or_covered() -> None:
    book = TrackBook(TrackConfig(confirm_frames=2))
    boxes = [[0, 50, 30, 80], [100, 50, 140, 90], [130, 60, 170, 100], [60, 10, 90, 40]]
    book.update(1, _dets(boxes))
    seen, _, _ = book.update(2, _dets(boxes))
    assert len(seen) == 4
    chosen = {tuple(int(v) for v in t.box) for t in book.to_classify(2, seen, 192, 144)}
    assert chosen == {(60, 10, 90, 40)}  # at the edge: no; overlapping each other: no
    assert book.to_classify(2, seen, 192, 144) == []  # asked already, answer pending


def _answer(label: int, p: float) -> np.ndarray:
    row = np.full(10, (1 - p) / 9, np.float32)
    row[label] = p
    return row


def test_two_confident_contradictions_split_a_track_onto_a_new_id() -> None:
    book = TrackBook(TrackConfig(confirm_frames=1, split_after=3, split_confidence=0.7))
    book.update(1, _dets([[10, 10, 50, 50]]))
    (track,) = book.update(2, _dets([[12, 10, 52, 50]]))[0]
    for _ in range(3):
        assert book.vote(track, _answer(2, 0.9))[0] is track
    assert track.label_id == 2
    # One contradiction, then agreement again: a doubtful crop, not another object.
    assert book.vote(track, _answer(5, 0.9)) == (track, False)
    assert book.vote(track, _answer(2, 0.9))[0] is track and track.doubt is None
    # A weak contradiction is no evidence at all.
    assert book.vote(track, _answer(5, 0.5))[0] is track and track.doubt is None
    assert book.vote(track, _answer(2, 0.9))[0] is track
    # Two confident answers in a row for another class: the id went to another object.
    assert book.vote(track, _answer(5, 0.8)) == (track, False)
    new, changed = book.vote(track, _answer(5, 0.8))
    assert changed and new is not track and new.id != track.id
    assert new.label_id == 5 and new.crops == 2 and track.label_id == 2
    (seen,) = book.update(3, _dets([[14, 10, 54, 50]]))[0]
    assert seen is new  # the book reports the new id from now on
    assert book.tracks == {next(iter(book.tracks)): new}


def test_crops_are_area_shrunk_and_stretched_to_full_range() -> None:
    from tinyserve.tracking import crop_square

    luma = np.zeros((100, 100), np.uint8)
    luma[20:60, 20:60] = 40  # a dim object: its own light, not its shape
    luma[30:50, 38:42] = 120  # a thin bright stroke
    crop = crop_square(luma, np.array([20, 20, 60, 60], np.float32), (20, 20))
    assert crop.max() == 255 and crop.min() == 0
    assert crop[10, 9:11].min() == 255  # the stroke survives the shrink at full brightness
    plain = crop_square(luma, np.array([20, 20, 60, 60], np.float32), (20, 20), stretch=False)
    assert plain.max() == 120 and plain[0, 0] == 40
    flat = crop_square(np.full((50, 50), 90, np.uint8), np.array([5, 5, 25, 25]), (10, 10))
    assert (flat == 90).all()  # nothing to stretch


def test_an_image_folder_is_one_sequence_in_name_order(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (64, 48), (i * 50, 0, 0)).save(tmp_path / f"{i:03d}.png")
    decoder = Decoder(str(tmp_path), (32, 24), SourcePolicy(root=tmp_path.parent))
    decoder.start()
    decoder.join(10)
    frames = [decoder.get() for _ in range(5)]
    assert decoder.stats.error is None and decoder.stats.decoded == 5
    assert [f.index for f in frames if f] == [1, 2, 3, 4, 5]
    reds = [int(f.pixels[..., 0].mean()) for f in frames if f]
    assert reds == sorted(reds) and frames[0] is not None and frames[0].pixels.shape == (24, 32, 3)


def test_detector_pixels_match_ffmpegs_scaler_in_colour_and_shape() -> None:
    import av

    from tinyserve.video_sources import detector_pixels

    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[..., 1] = np.linspace(0, 255, 640, dtype=np.uint8)[None, :]  # a green ramp
    rgb[100:300, 100:300] = (220, 30, 30)  # a red square
    rgb[320:420, 400:600] = (30, 30, 220)  # a blue one
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    for width, height in ((320, 240), (256, 192), (160, 120)):
        ours = detector_pixels(frame, width, height)
        ffmpeg = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
        assert ours.shape == ffmpeg.shape == (height, width, 3) and ours.dtype == np.uint8
        assert np.abs(ours.astype(int) - ffmpeg.astype(int)).mean() < 3.0
        sx, sy = width / 640, height / 480
        red = ours[int(200 * sy), int(200 * sx)]
        blue = ours[int(370 * sy), int(500 * sx)]
        assert red[0] > 180 and red[1:].max() < 70 and blue[2] > 180 and blue[:2].max() < 70
    # Odd sizes and full-range frames go through FFmpeg's scaler itself.
    odd = frame.to_ndarray(width=321, height=241, format="rgb24", interpolation="AREA")
    assert np.array_equal(detector_pixels(frame, 321, 241), odd)
    full = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    expected = full.to_ndarray(width=320, height=240, format="rgb24", interpolation="AREA")
    assert np.array_equal(detector_pixels(full, 320, 240), expected)


def test_decoding_skips_the_deblocking_filter_unless_frames_are_kept(scenes: Path) -> None:
    import av

    from tinyserve.video_sources import _grey_plane, configure_decoding

    video = next((scenes / "test").glob("*/video.mp4"))

    def frames(deblock: bool) -> np.ndarray:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            configure_decoding(stream, deblock=deblock)
            return np.stack([_grey_plane(f)[0] for f in container.decode(stream)])

    fast, filtered = frames(False), frames(True)
    assert fast.shape == filtered.shape
    diff = np.abs(fast.astype(int) - filtered.astype(int))
    assert diff.max() > 0 and diff.mean() < 3.0  # the filter only touches block edges
    policy = SourcePolicy(confined=False)
    assert not Decoder(str(video), (64, 48), policy).deblock
    kept = Decoder(str(video), (64, 48), policy, keep_images=True, max_frames=5)
    kept.start()
    kept.join(10)
    first = kept.get()
    assert first is not None and np.array_equal(first.plane, filtered[0])


def test_bench_video_scores_and_times_the_naive_loop_on_small_scenes(scenes: Path) -> None:
    from tinyserve.bench.video import BenchVideoConfig, run_bench

    models = Path(__file__).resolve().parents[1] / "models"
    config = BenchVideoConfig(scenes, models, detector="scene-det:1", parts=("accuracy", "naive"))
    lines: list[str] = []
    result = run_bench(config, lines.append)
    (detector,) = result["detectors"]
    assert 0.0 <= detector["map50"] <= 1.0
    tracking = result["tracking"]
    assert {"mota", "idf1"} <= set(tracking) and tracking["idf1"] <= 1.0
    naive = result["naive"]
    assert naive["frames"] == 60 and naive["fps"] > 0
    assert any(line.startswith("naive loop:") for line in lines)
