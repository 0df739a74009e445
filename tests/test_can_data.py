"""zoo.data.can_bus: the simulated CAN bus (DBC, ECU timing, attacks), its logs, the windows and the can_bus builder."""

import collections
import os

import can
import numpy as np
import pytest

from zoo.data import can_bus

SECONDS = 2.0  # per episode of the shared recording
SEED = 3


@pytest.fixture(scope="module")
def frames():
  return can_bus.simulate(SECONDS, SEED)


def _episode(frames, k):
  return [(m, label) for m, label in frames if k * SECONDS <= m.timestamp < (k + 1) * SECONDS]


def _message(frame_id, t=0.0, data=bytes(8), extended=False):
  return can.Message(timestamp=t, arbitration_id=frame_id, is_extended_id=extended, data=data)


def _user_log(path, ids):
  """A log as a user would record it: no labels file."""
  with can.Logger(str(path)) as writer:
    for n, (frame_id, extended) in enumerate(ids):
      writer.on_message_received(_message(frame_id, 0.001 * n, extended=extended))
  return path


def test_database_and_vocabulary():
  db = can_bus.database()
  ids = sorted(m.frame_id for m in db.messages)
  assert 12 <= len(ids) <= 20
  assert can_bus.ID_VOCABULARY == (-1, -1, *ids) and can_bus.VOCAB_SIZE == len(ids) + 2
  assert {can_bus.ID_INDEX[i]: i for i in ids} == dict(enumerate(ids, start=2))
  for message in db.messages:
    assert 0 <= message.frame_id <= 0x7FF and not message.is_extended_frame
    assert 10 <= message.cycle_time <= 1000 and message.signals
  assert can_bus.DOS_ID not in can_bus.ID_INDEX and can_bus.SPOOF_ID in can_bus.ID_INDEX
  forged = db.decode_message(can_bus.SPOOF_ID, can_bus.SPOOF_PAYLOAD)
  assert forged == {"EngineRPM": 7000.0, "ThrottlePos": 0.0, "EngineLoad": 0.0}


def test_frames_decode_to_the_simulated_signal_values(frames):
  db = can_bus.database()
  genuine = [m for m, label in frames if label == "normal"]
  expected = [f for k in range(len(can_bus.EPISODES)) for f in can_bus.ecu_traffic(SECONDS, (SEED, k), k * SECONDS)]
  assert len(genuine) == len(expected)
  values = collections.defaultdict(list)
  for m, (t, frame_id, signals) in zip(genuine, expected):
    assert (m.timestamp, m.arbitration_id, m.is_extended_id, m.channel) == (t, frame_id, False, can_bus.CHANNEL)
    message = db.get_message_by_frame_id(frame_id)
    assert m.dlc == len(m.data) == message.length
    decoded = message.decode(bytes(m.data), decode_choices=False)
    assert decoded.keys() == signals.keys()
    for signal in message.signals:
      assert abs(decoded[signal.name] - signals[signal.name]) <= signal.scale / 2 + 1e-9, (signal.name, t)
      values[signal.name].append(decoded[signal.name])
  # The driving model moves: speed, RPM and steering vary, RPM follows speed.
  for name in ("VehicleSpeed", "EngineRPM", "SteeringAngle", "WheelSpeedFL", "YawRate"):
    assert np.std(values[name]) > 0.1, name
  assert min(values["EngineRPM"]) >= 750.0
  again = can_bus.simulate(0.5, SEED)  # deterministic in the seed
  assert [(m.timestamp, m.arbitration_id, bytes(m.data), label) for m, label in again] == [
    (m.timestamp, m.arbitration_id, bytes(m.data), label) for m, label in can_bus.simulate(0.5, SEED)
  ]


def test_normal_periods_match_the_cycle_times(frames):
  episode = _episode(frames, 0)
  assert {label for _, label in episode} == {"normal"}
  times = collections.defaultdict(list)
  for m, _ in episode:
    times[m.arbitration_id].append(m.timestamp)
  assert sorted(times) == list(can_bus.ID_VOCABULARY[2:])
  for message in can_bus.database().messages:
    period = message.cycle_time / 1000.0
    gaps = np.diff(times[message.frame_id])
    assert len(gaps) >= 1 and len(times[message.frame_id]) == pytest.approx(SECONDS / period, abs=1)
    assert np.all(np.abs(gaps - period) <= 2 * can_bus.JITTER_S + 2e-6), message.name
    if period <= 0.02:  # enough frames to see the jitter
      assert np.abs(gaps - period).max() > can_bus.JITTER_S / 2, message.name


@pytest.mark.parametrize("k", range(1, len(can_bus.EPISODES)))
def test_attack_signatures(frames, k):
  attack = can_bus.EPISODES[k]
  episode = _episode(frames, k)
  assert {label for _, label in episode} == {"normal", attack}
  injected = [m for m, label in episode if label == attack]
  genuine = [m for m, label in episode if label == "normal"]
  begin, end = (k * SECONDS + offset for offset in can_bus.attack_stretch(attack, SECONDS))
  times = np.array([m.timestamp for m in injected])
  assert begin <= times.min() and times.max() < end
  assert any(m.timestamp < begin for m in genuine) and any(m.timestamp >= end for m in genuine)
  assert all(t1 <= t2 for t1, t2 in zip([m.timestamp for m, _ in frames], [m.timestamp for m, _ in frames][1:]))
  if attack == "dos":
    assert {(m.arbitration_id, bytes(m.data)) for m in injected} == {(0x000, bytes(8))}
    np.testing.assert_allclose(np.diff(times), 0.0003, atol=1.5e-6)
    assert len(injected) == pytest.approx((end - begin) / 0.0003, abs=1)
  elif attack == "fuzzy":
    np.testing.assert_allclose(np.diff(times), 0.0005, atol=1.5e-6)
    ids = np.array([m.arbitration_id for m in injected])
    assert ids.min() >= 0 and ids.max() <= 0x7FF and not any(m.is_extended_id for m in injected)
    assert len(set(ids.tolist())) > len(ids) / 2  # random over 2048 IDs, not a few repeated ones
    assert (ids < 0x400).mean() == pytest.approx(0.5, abs=0.1)
    assert np.mean([i in can_bus.ID_INDEX for i in ids]) < 0.05
    assert len({bytes(m.data) for m in injected}) == len(injected) and all(m.dlc == 8 for m in injected)
  elif attack == "spoofing":
    assert {(m.arbitration_id, bytes(m.data)) for m in injected} == {(can_bus.SPOOF_ID, can_bus.SPOOF_PAYLOAD)}
    np.testing.assert_allclose(np.diff(times), 0.001, atol=1.5e-6)
  else:  # replay: earlier genuine frames, byte for byte, shifted by the stretch's start offset
    shift = begin - k * SECONDS
    by_time = {(m.timestamp, m.arbitration_id): m for m in genuine}
    for m in injected:
      original = by_time[(round(m.timestamp - shift, 6), m.arbitration_id)]
      assert bytes(original.data) == bytes(m.data) and original.dlc == m.dlc
    source = [m for m in genuine if m.timestamp < k * SECONDS + (end - begin)]
    assert len(injected) == len(source) > 100


@pytest.mark.parametrize("suffix", [".log", ".csv"])
def test_log_round_trip(frames, tmp_path, suffix):
  path = tmp_path / f"bus{suffix}"
  can_bus.write_log(path, frames)
  back = can_bus.read_log(path)
  assert len(back) == len(frames)
  for (m, label), (b, label_back) in zip(frames, back):
    assert (b.timestamp, b.arbitration_id, b.is_extended_id, bytes(b.data), b.dlc) == (
      m.timestamp,
      m.arbitration_id,
      m.is_extended_id,
      bytes(m.data),
      m.dlc,
    )
    assert label_back == label
  if suffix == ".log":
    assert all(b.channel == can_bus.CHANNEL and b.is_rx for b, _ in back)
  os.rename(f"{path}.labels", tmp_path / "elsewhere.labels")
  assert {label for _, label in can_bus.read_log(path)} == {None}
  assert [label for _, label in can_bus.read_log(path, labels=tmp_path / "elsewhere.labels")] == [
    label for _, label in frames
  ]


def test_windows_by_hand(tmp_path):
  # Vocabulary: 0x0C4 -> 2, 0x0D0 -> 3, 0x0F1 -> 4, 0x130 -> 5, ..., 0x545 -> 17, 0x5A0 -> 18; 0x000 -> UNKNOWN (1).
  rows = [
    (0x0C4, "normal"),
    (0x0D0, "normal"),
    (0x000, "dos"),
    (0x5A0, "normal"),
    (0x545, "normal"),
    (0x130, "normal"),
    (0x0D0, "spoofing"),
    (0x0F1, "normal"),
    (0x130, "normal"),  # a partial third window: dropped
  ]
  path = tmp_path / "two.log"
  can_bus.write_log(path, [(_message(i, 0.001 * n), label) for n, (i, label) in enumerate(rows)])
  ids, labels = can_bus.windows_from_log(path, window=4, unknown="map")
  np.testing.assert_array_equal(ids, [[2, 3, 1, 18], [17, 5, 3, 4]])
  np.testing.assert_array_equal(labels, [1, 3])  # dos, spoofing
  assert ids.dtype == np.int32 and labels.dtype == np.int32

  # Several attacks in a window: the most frequent, ties in LABELS order.
  rows = ["dos", "fuzzy", "fuzzy", "normal", "fuzzy", "dos", "normal", "normal"]
  path = tmp_path / "mixed.log"
  can_bus.write_log(path, [(_message(0x0C4, 0.001 * n), label) for n, label in enumerate(rows)])
  assert can_bus.windows_from_log(path, window=4)[1].tolist() == [2, 1]

  # The default window, on a log without labels.
  path = _user_log(tmp_path / "user.log", [(can_bus.ID_VOCABULARY[2 + n % 17], False) for n in range(69)])
  ids, labels = can_bus.windows_from_log(path)
  assert ids.shape == (2, can_bus.WINDOW) and labels is None
  assert ids.flatten().tolist() == [2 + n % 17 for n in range(64)]


def test_unknown_id_in_a_user_log(tmp_path):
  path = _user_log(tmp_path / "user.log", [(0x0C4, False), (0x0D0, False), (0x130, False), (0x7AB, False)])
  with pytest.raises(ValueError) as error:
    can_bus.windows_from_log(path, window=2)
  assert str(error.value) == (
    f"{path}: frame 3 has CAN ID 0x7AB, which is not in the message database (17 known IDs, e.g. 0x0C4, 0x0D0); "
    "allowed: IDs of the database, or unknown='map' to map them to UNKNOWN"
  )
  ids, labels = can_bus.windows_from_log(path, window=2, unknown="map")
  assert ids.tolist() == [[2, 3], [5, can_bus.UNKNOWN]] and labels is None
  # A 29-bit ID is never in the (11-bit) database, even with the number of one of its IDs.
  path = _user_log(tmp_path / "extended.log", [(0x0C4, True), (0x0C4, False)])
  with pytest.raises(ValueError, match=r"frame 0 has CAN ID 0x000000C4, which is not"):
    can_bus.windows_from_log(path, window=2)
  assert can_bus.windows_from_log(path, window=2, unknown="map")[0].tolist() == [[1, 2]]
  with pytest.raises(ValueError, match="unknown='drop'; allowed: 'error', 'map'"):
    can_bus.windows_from_log(path, unknown="drop")


@pytest.mark.parametrize(
  "name, content",
  [
    ("garbage.log", b"this is not a CAN log\n"),
    ("binary.log", bytes(range(128, 256)) * 4),
    ("empty.log", b""),
    ("empty.csv", b""),
    ("garbage.asc", b"nothing here\nat all\n"),
    ("garbage.blf", b"LOGG" + bytes(range(200))),
    ("frames.xyz", b"(0.000000) vcan0 0C4#0000 R\n"),
    ("no_extension", b"(0.000000) vcan0 0C4#0000 R\n"),
  ],
)
def test_unreadable_files(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError) as error:
    can_bus.windows_from_log(path)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{path}: python-can cannot read it as a CAN log (")
  assert message.endswith(
    "allowed: a python-can log file with extension .asc, .blf, .csv, .db, .log, .mf4, .trc (or one of these + .gz)"
  )


def test_missing_file_and_bad_labels(tmp_path):
  with pytest.raises(FileNotFoundError):
    can_bus.windows_from_log(tmp_path / "missing.log")
  path = _user_log(tmp_path / "user.log", [(0x0C4, False)] * 3)
  (tmp_path / "user.log.labels").write_text("normal\nnormal\n")
  with pytest.raises(ValueError, match=r"2 labels for the 3 frames of"):
    can_bus.read_log(path)
  (tmp_path / "user.log.labels").write_text("normal\nnormal\nattack\n")
  with pytest.raises(ValueError, match=r"labels \['attack'\] are not in"):
    can_bus.read_log(path)
  can_bus.write_log(path, [(_message(0x0C4), None)] * 3)  # no labels: the stale sidecar goes
  assert not (tmp_path / "user.log.labels").exists() and len(can_bus.read_log(path)) == 3


def test_builder(tmp_path):
  builder = can_bus.CanBus(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  assert can_bus.CanBus.FORMAT_INFO == {"vocab_size": can_bus.VOCAB_SIZE, "window": can_bus.WINDOW}
  assert builder.info.features["label"].names == list(can_bus.LABELS)
  sizes = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split)
    record = source[0]
    assert record["ids"].shape == (can_bus.WINDOW,) and record["ids"].dtype == np.int32
    records = [source[i] for i in range(len(source))]
    ids = np.stack([r["ids"] for r in records])
    labels = collections.Counter(int(r["label"]) for r in records)
    assert ids.min() >= 1 and ids.max() < can_bus.VOCAB_SIZE  # no PAD in full windows
    assert sorted(labels) == list(range(len(can_bus.LABELS)))
    assert 0.35 < labels[0] / len(records) < 0.65  # normal about half, every attack a fair share
    assert min(labels.values()) > 0.08 * len(records)
    sizes[split] = len(records)
    log = tmp_path / "downloads" / "can_bus" / f"{split}_seed{getattr(can_bus, split.upper() + '_SEED')}.log"
    assert log.is_file() and (tmp_path / "downloads" / "can_bus" / f"{log.name}.labels").is_file()
  assert sizes["train"] > 2000 and sizes["test"] > 500
