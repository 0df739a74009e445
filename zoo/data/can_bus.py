"""A simulated CAN-bus intrusion-detection dataset (windows of CAN IDs, 5 classes), made with no download.

For LSF-IDM-style models (a BERT-style teacher over windows of CAN IDs, distilled into a BiLSTM student), in the
manner of the HCRL Car-Hacking dataset.

What is simulated:
* A small car's CAN bus, defined by the DBC database `DBC` (17 messages, 11-bit IDs 0x0C4..0x5A0: steering, engine
  RPM/throttle/load, brake, wheel speeds, vehicle speed, yaw/accelerations, torque, transmission, cruise control,
  temperatures, fuel, battery, doors, lights, climate, instrument cluster, airbag), each with its cycle time
  (`GenMsgCycleTime`, 10 ms .. 1000 ms; about 575 frames/s in all).
* ECUs (`ecu_traffic`): every message is sent at its period from a random phase, each frame with a uniform jitter of
  +-JITTER_S around its nominal time (the jitter does not accumulate), carrying the signals of a seeded driving model
  sampled every 10 ms (speed follows piecewise targets with noisy acceleration; RPM from speed and the gear chosen by
  speed; throttle/brake from the acceleration; wheel speeds from speed and steering; steering a mean-reverting random
  walk; yaw rate and lateral acceleration from speed and steering; slow temperatures, fuel, battery, odometer),
  encoded with cantools. Time is simulated, never slept: timestamps are explicit, rounded to 1 us.
* The bus (`simulate`): frames are sent in timestamp order through a python-can virtual bus (a sender Bus keeping the
  timestamps, `preserve_timestamps=True`) and read back by a second Bus on the same channel, the logger; the frames
  it receives are the recording. Their channel is set to CHANNEL ('vcan0').

Attacks (`simulate` makes one episode per kind, `EPISODES`, each of the same length, back to back; in an attack
episode the attack occupies one stretch in the middle, `attack_stretch`, with normal traffic before, during and
after it; ECU traffic continues during every attack):
* 'dos': ID 0x000 (the highest priority) every DOS_PERIOD_S = 0.3 ms, 8 zero bytes;
* 'fuzzy': uniformly random 11-bit IDs (0x000..0x7FF) with 8 random bytes every FUZZY_PERIOD_S = 0.5 ms;
* 'spoofing': SPOOF_ID (ENGINE_RPM, 0x0D0) every SPOOF_PERIOD_S = 1 ms with the fixed forged payload SPOOF_PAYLOAD
  (7000 rpm, throttle 0, load 0);
* 'replay': the genuine frames of the episode's first stretch, as long as the attack, re-sent byte for byte with
  their timestamps shifted by the attack's start offset (the attacker records from the start of the episode and
  replays with that delay), interleaved with the live traffic.
Every frame is labelled: 'normal' for ECU frames, the attack's name for injected ones. The stretch lengths differ by
attack (ATTACK_FRACTION of the episode) so that each class gets a similar number of windows.

Windows and labels (`windows_from_log`): the frames of a log, in file order, are cut into consecutive non-overlapping
windows of WINDOW CAN IDs (stride = window; the trailing partial window is dropped; error frames are skipped). `ids`
holds each frame's index in the ID vocabulary: 0 = PAD (never in a full window), 1 = UNKNOWN (an ID not in the DBC,
e.g. most fuzzy frames and the DoS ID 0x000; an extended 29-bit ID is always unknown), then the DBC's IDs in
ascending order from 2 (`ID_VOCABULARY[i]` is the CAN ID of index i; -1 stands for PAD and UNKNOWN). A window's
label is the attack of the attack frames in it ('normal' if none; the most frequent attack if several, ties in
LABELS order - a window never holds two attacks in `simulate`'s recordings, whose attack stretches are far apart).
Note that DoS and fuzzy frames both map to UNKNOWN, so those two classes differ in these windows only by the share of
UNKNOWN (about 84% vs 77%) and by the rare fuzzy frame whose random ID is in the DBC.

Logs (`write_log` / `read_log`): any format python-can writes and reads, chosen by the file's extension; the dataset
uses the candump `.log` format (timestamps with 1 us resolution, so simulated timestamps round-trip exactly; `.csv`
also does). The frame labels go to a sidecar file, `path + ".labels"`, one label per line in frame order; a log
without one (a user's recording) has no labels.

The TFDS builder `CanBus` ('can_bus'): features `ids` int32 [WINDOW] and `label` (ClassLabel over LABELS); splits
`train` (simulate(TRAIN_SECONDS_PER_EPISODE, TRAIN_SEED)) and `test` (simulate(TEST_SECONDS_PER_EPISODE, TEST_SEED):
its own recording with another seed, so no test window is a near-duplicate of a train window); each recording is
written to a `.log` under the download directory and the windows are read back from it with `unknown="map"`.

How this differs from the real Car-Hacking dataset: that one was recorded from a real car (a Hyundai YF Sonata, about
26 CAN IDs, real ECU timing and payloads, real bus arbitration). Here the car, its ECUs and its timing are simulated
and the bus is python-can's virtual bus: no arbitration, no bit timing, no bus-load effects (a DoS flood does not
delay other frames, frames never collide or get retransmitted), no error frames, and the driving model is simple.
"""

from __future__ import annotations

import functools
import itertools
import os
import pathlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tensorflow_datasets as tfds

if TYPE_CHECKING:
  import can
  import cantools

WINDOW = 32  # [guess] CAN IDs per window
LABELS = ("normal", "dos", "fuzzy", "spoofing", "replay")
EPISODES = LABELS  # simulate's episodes, in time order: normal-only, then one per attack
CHANNEL = "vcan0"  # the channel of the recorded frames

DBC = """\
VERSION ""

NS_ :
  CM_
  BA_DEF_
  BA_
  VAL_
  BA_DEF_DEF_

BS_:

BU_: ECM TCM ABS EPS BCM HVAC IPC ACU

BO_ 196 STEERING: 4 EPS
 SG_ SteeringAngle : 0|16@1- (0.1,0) [-780|780] "deg" ECM,ABS,IPC
 SG_ SteeringRate : 16|16@1- (0.1,0) [-1000|1000] "deg/s" ECM,ABS

BO_ 208 ENGINE_RPM: 8 ECM
 SG_ EngineRPM : 0|16@1+ (0.25,0) [0|8000] "rpm" TCM,IPC
 SG_ ThrottlePos : 16|8@1+ (0.4,0) [0|100] "%" TCM
 SG_ EngineLoad : 24|8@1+ (0.4,0) [0|100] "%" TCM

BO_ 241 BRAKE: 4 ABS
 SG_ BrakePressure : 0|16@1+ (0.01,0) [0|250] "bar" ECM
 SG_ BrakePedal : 16|1@1+ (1,0) [0|1] "" ECM,BCM
 SG_ AbsActive : 17|1@1+ (1,0) [0|1] "" ECM,IPC

BO_ 304 WHEEL_SPEEDS: 8 ABS
 SG_ WheelSpeedFL : 0|16@1+ (0.01,0) [0|300] "km/h" ECM,EPS
 SG_ WheelSpeedFR : 16|16@1+ (0.01,0) [0|300] "km/h" ECM,EPS
 SG_ WheelSpeedRL : 32|16@1+ (0.01,0) [0|300] "km/h" ECM,EPS
 SG_ WheelSpeedRR : 48|16@1+ (0.01,0) [0|300] "km/h" ECM,EPS

BO_ 344 VEHICLE_SPEED: 4 ABS
 SG_ VehicleSpeed : 0|16@1+ (0.01,0) [0|300] "km/h" ECM,TCM,EPS,IPC
 SG_ SpeedValid : 16|1@1+ (1,0) [0|1] "" ECM,TCM,EPS,IPC

BO_ 380 VEHICLE_DYNAMICS: 6 ABS
 SG_ YawRate : 0|16@1- (0.01,0) [-150|150] "deg/s" EPS,ACU
 SG_ LatAccel : 16|16@1- (0.001,0) [-20|20] "m/s2" EPS,ACU
 SG_ LongAccel : 32|16@1- (0.001,0) [-20|20] "m/s2" EPS,ACU

BO_ 416 ENGINE_TORQUE: 4 ECM
 SG_ EngineTorque : 0|16@1- (0.1,0) [-500|800] "Nm" TCM,ABS
 SG_ AccelPedal : 16|8@1+ (0.4,0) [0|100] "%" TCM,ABS

BO_ 501 TRANSMISSION: 4 TCM
 SG_ GearSelector : 0|4@1+ (1,0) [0|3] "" ECM,IPC,BCM
 SG_ CurrentGear : 4|4@1+ (1,0) [0|8] "" ECM,IPC
 SG_ TransOilTemp : 8|8@1+ (1,-40) [-40|215] "degC" ECM

BO_ 608 CRUISE_CONTROL: 2 ECM
 SG_ CruiseActive : 0|1@1+ (1,0) [0|1] "" IPC
 SG_ CruiseSetSpeed : 8|8@1+ (1,0) [0|250] "km/h" IPC

BO_ 704 ENGINE_TEMPS: 4 ECM
 SG_ CoolantTemp : 0|8@1+ (1,-40) [-40|215] "degC" IPC,HVAC
 SG_ OilTemp : 8|8@1+ (1,-40) [-40|215] "degC" IPC
 SG_ IntakeAirTemp : 16|8@1+ (1,-40) [-40|215] "degC" IPC

BO_ 809 FUEL: 4 ECM
 SG_ FuelLevel : 0|8@1+ (0.4,0) [0|100] "%" IPC
 SG_ FuelRate : 8|16@1+ (0.01,0) [0|100] "l/h" IPC

BO_ 944 BATTERY: 4 BCM
 SG_ BatteryVoltage : 0|16@1+ (0.01,0) [0|20] "V" ECM,IPC
 SG_ BatteryCurrent : 16|16@1- (0.1,0) [-300|300] "A" ECM

BO_ 1056 BODY_DOORS: 2 BCM
 SG_ DoorFL : 0|1@1+ (1,0) [0|1] "" IPC
 SG_ DoorFR : 1|1@1+ (1,0) [0|1] "" IPC
 SG_ DoorRL : 2|1@1+ (1,0) [0|1] "" IPC
 SG_ DoorRR : 3|1@1+ (1,0) [0|1] "" IPC
 SG_ Trunk : 4|1@1+ (1,0) [0|1] "" IPC
 SG_ Hood : 5|1@1+ (1,0) [0|1] "" IPC
 SG_ Locked : 8|1@1+ (1,0) [0|1] "" IPC

BO_ 1088 LIGHTS: 1 BCM
 SG_ Headlights : 0|2@1+ (1,0) [0|3] "" IPC
 SG_ TurnLeft : 2|1@1+ (1,0) [0|1] "" IPC
 SG_ TurnRight : 3|1@1+ (1,0) [0|1] "" IPC
 SG_ BrakeLights : 4|1@1+ (1,0) [0|1] "" IPC
 SG_ Hazard : 5|1@1+ (1,0) [0|1] "" IPC

BO_ 1264 CLIMATE: 4 HVAC
 SG_ CabinTemp : 0|8@1+ (0.5,-20) [-20|107.5] "degC" IPC
 SG_ TargetTemp : 8|8@1+ (0.5,0) [0|127.5] "degC" IPC
 SG_ FanSpeed : 16|4@1+ (1,0) [0|7] "" IPC
 SG_ AcOn : 20|1@1+ (1,0) [0|1] "" ECM,IPC

BO_ 1349 INSTRUMENT: 8 IPC
 SG_ Odometer : 0|24@1+ (0.1,0) [0|1677721.5] "km" BCM
 SG_ TripDistance : 24|16@1+ (0.1,0) [0|6553.5] "km" BCM
 SG_ CheckEngine : 40|1@1+ (1,0) [0|1] "" BCM
 SG_ LowFuel : 41|1@1+ (1,0) [0|1] "" BCM

BO_ 1440 AIRBAG: 1 ACU
 SG_ AirbagReady : 0|1@1+ (1,0) [0|1] "" IPC
 SG_ SeatbeltDriver : 1|1@1+ (1,0) [0|1] "" IPC
 SG_ SeatbeltPassenger : 2|1@1+ (1,0) [0|1] "" IPC
 SG_ PassengerPresent : 3|1@1+ (1,0) [0|1] "" IPC

CM_ "A small simulated car for zoo.data.can_bus.";
CM_ BO_ 208 "Engine speed, throttle and load; the spoofing attack forges this message.";
BA_DEF_ BO_ "GenMsgCycleTime" INT 0 10000;
BA_DEF_DEF_ "GenMsgCycleTime" 0;
BA_ "GenMsgCycleTime" BO_ 196 10;
BA_ "GenMsgCycleTime" BO_ 208 10;
BA_ "GenMsgCycleTime" BO_ 241 20;
BA_ "GenMsgCycleTime" BO_ 304 20;
BA_ "GenMsgCycleTime" BO_ 344 20;
BA_ "GenMsgCycleTime" BO_ 380 10;
BA_ "GenMsgCycleTime" BO_ 416 20;
BA_ "GenMsgCycleTime" BO_ 501 50;
BA_ "GenMsgCycleTime" BO_ 608 100;
BA_ "GenMsgCycleTime" BO_ 704 100;
BA_ "GenMsgCycleTime" BO_ 809 200;
BA_ "GenMsgCycleTime" BO_ 944 100;
BA_ "GenMsgCycleTime" BO_ 1056 200;
BA_ "GenMsgCycleTime" BO_ 1088 100;
BA_ "GenMsgCycleTime" BO_ 1264 500;
BA_ "GenMsgCycleTime" BO_ 1349 1000;
BA_ "GenMsgCycleTime" BO_ 1440 500;
VAL_ 501 GearSelector 0 "P" 1 "R" 2 "N" 3 "D" ;
VAL_ 1088 Headlights 0 "Off" 1 "Parking" 2 "Low" 3 "High" ;
"""

# The DBC's frame IDs, parsed without cantools so that importing this module needs neither cantools nor python-can
# (tests check that cantools reads the same IDs).
_DBC_IDS = tuple(sorted(int(i) for i in re.findall(r"^BO_ (\d+) ", DBC, flags=re.MULTILINE)))
PAD, UNKNOWN = 0, 1  # vocabulary indices
ID_VOCABULARY: tuple[int, ...] = (-1, -1) + _DBC_IDS  # index -> CAN ID; -1 for PAD and UNKNOWN
VOCAB_SIZE = len(ID_VOCABULARY)
ID_INDEX = {can_id: index for index, can_id in enumerate(ID_VOCABULARY) if index >= 2}  # CAN ID -> index

JITTER_S = 0.0002  # each periodic frame is sent within +-0.2 ms of its nominal time
DRIVE_STEP_S = 0.01  # the driving model's time step
DOS_ID, DOS_PERIOD_S, DOS_PAYLOAD = 0x000, 0.0003, bytes(8)
FUZZY_PERIOD_S = 0.0005
SPOOF_ID, SPOOF_PERIOD_S = 0x0D0, 0.001
SPOOF_PAYLOAD = bytes.fromhex("606D000000000000")  # ENGINE_RPM: EngineRPM 7000 (raw 28000), ThrottlePos 0, EngineLoad 0
# The share of an attack episode its attack stretch takes, chosen so that each attack gets about as many windows as
# the others (a flood adds more frames per second than a replay) and normal windows are about half of all.
ATTACK_FRACTION = {"dos": 0.135, "fuzzy": 0.2, "spoofing": 0.33, "replay": 0.46}

TRAIN_SEED, TEST_SEED = 0, 1
TRAIN_SECONDS_PER_EPISODE, TEST_SECONDS_PER_EPISODE = 24.0, 8.0

_BUS_CHANNELS = itertools.count()  # a fresh virtual channel per simulation, so concurrent ones never mix


@functools.cache
def database() -> cantools.database.can.Database:
  """The DBC database, loaded with cantools."""
  import cantools  # pylint: disable=g-import-not-at-top

  return cantools.database.load_string(DBC, "dbc")


def _rng(seed: int | Sequence[int]) -> np.random.Generator:
  return np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)


def _drive(steps: int, rng: np.random.Generator) -> dict[str, list]:
  """The driving model: every DBC signal's physical value at each of `steps` steps of DRIVE_STEP_S, as lists."""
  dt = DRIVE_STEP_S
  time = np.arange(steps) * dt
  accel_noise, steer_noise = rng.normal(0.0, 0.3, steps), rng.normal(0.0, 1.0, steps)
  speed, steer = np.empty(steps), np.empty(steps)
  accel, target_at = np.empty(steps), np.empty(steps)
  v, angle = rng.uniform(0.0, 100.0), rng.uniform(-30.0, 30.0)
  target, segment_left = rng.uniform(20.0, 130.0), rng.uniform(2.0, 15.0)
  for i in range(steps):
    if segment_left <= 0.0:  # a new target speed: a stop now and then, else cruising at some speed
      target = 0.0 if rng.random() < 0.15 else rng.uniform(20.0, 130.0)
      segment_left = rng.uniform(4.0, 15.0)
    segment_left -= dt
    a = min(max(0.8 * (target - v) / 3.6, -4.0), 2.5) + accel_noise[i]  # m/s^2
    v = min(max(v + a * dt * 3.6, 0.0), 200.0)
    # A mean-reverting random walk, calmer at speed.
    angle = min(max(0.998 * angle + steer_noise[i] * (2.0 if v < 50.0 else 0.6), -450.0), 450.0)
    speed[i], steer[i], accel[i], target_at[i] = v, angle, a, target
  steer_rate = np.clip(np.diff(steer, prepend=steer[0]) / dt, -1000.0, 1000.0)
  gear = np.searchsorted([15.0, 30.0, 50.0, 70.0, 95.0], speed, side="right") + 1  # 1..6 by speed
  kmh_per_krpm = np.array([8.0, 14.0, 21.0, 29.0, 37.0, 45.0])[gear - 1]
  throttle = np.clip(np.where(accel > 0.0, 8.0 + accel * 30.0, 3.0 * (speed > 0.5)), 0.0, 100.0)
  rpm = np.clip(np.maximum(750.0, speed / kmh_per_krpm * 1000.0) + throttle * 5.0, 0.0, 7000.0)
  load = np.clip(15.0 + 0.8 * throttle, 0.0, 100.0)
  brake = np.clip(np.where(accel < -0.5, -accel * 20.0, 0.0), 0.0, 150.0)
  yaw = np.clip(np.degrees(speed / 3.6 * np.tan(np.radians(steer / 15.0)) / 2.7), -150.0, 150.0)
  lateral = np.clip(speed / 3.6 * np.radians(yaw), -20.0, 20.0)
  wheel_noise = rng.normal(0.0, 0.05, (4, steps))
  turn = steer / 450.0 * 0.03  # inner wheels slower, outer faster
  start_temp, fuel_start = rng.uniform(30.0, 90.0), rng.uniform(20.0, 95.0)
  coolant = 90.0 - (90.0 - start_temp) * np.exp(-time / 300.0)
  distance = np.cumsum(speed / 3.6 * dt) / 1000.0  # km
  fuel_rate = 0.6 + load * 0.12
  fuel = np.clip(fuel_start - np.cumsum(fuel_rate) * dt / 3600.0 / 50.0 * 100.0, 0.0, 100.0)  # a 50 l tank
  blink = (np.floor(time / 0.5) % 2 == 0).astype(int)
  cabin = 21.0 + (rng.uniform(10.0, 35.0) - 21.0) * np.exp(-time / 200.0)
  ones, zeros = np.ones(steps, int), np.zeros(steps, int)
  const = lambda value: np.full(steps, value)
  cruise = ((target_at >= 90.0) & (np.abs(target_at - speed) < 3.0)).astype(int)
  headlights = int(rng.integers(0, 4))
  signals = {
    "SteeringAngle": steer,
    "SteeringRate": steer_rate,
    "EngineRPM": rpm,
    "ThrottlePos": throttle,
    "EngineLoad": load,
    "BrakePressure": brake,
    "BrakePedal": (brake > 0.0).astype(int),
    "AbsActive": (accel < -3.5).astype(int),
    "WheelSpeedFL": np.clip(speed * (1.0 - turn) + wheel_noise[0], 0.0, 300.0),
    "WheelSpeedFR": np.clip(speed * (1.0 + turn) + wheel_noise[1], 0.0, 300.0),
    "WheelSpeedRL": np.clip(speed * (1.0 - turn) + wheel_noise[2], 0.0, 300.0),
    "WheelSpeedRR": np.clip(speed * (1.0 + turn) + wheel_noise[3], 0.0, 300.0),
    "VehicleSpeed": speed,
    "SpeedValid": ones,
    "YawRate": yaw,
    "LatAccel": lateral,
    "LongAccel": np.clip(accel, -20.0, 20.0),
    "EngineTorque": np.clip(load * 3.0 - 30.0, -500.0, 800.0),
    "AccelPedal": throttle,
    "GearSelector": np.where(speed > 0.5, 3, 2),  # D while moving, N at a standstill
    "CurrentGear": gear,
    "TransOilTemp": np.round(coolant - 5.0),
    "CruiseActive": cruise,
    "CruiseSetSpeed": np.where(cruise == 1, np.round(target_at), 0.0),
    "CoolantTemp": np.round(coolant),
    "OilTemp": np.round(coolant + 8.0 * (1.0 - np.exp(-time / 100.0))),
    "IntakeAirTemp": const(float(np.round(rng.uniform(10.0, 35.0)))),
    "FuelLevel": fuel,
    "FuelRate": fuel_rate,
    "BatteryVoltage": np.clip(14.1 + rng.normal(0.0, 0.05, steps), 0.0, 20.0),
    "BatteryCurrent": np.clip(12.0 + rng.normal(0.0, 3.0, steps), -300.0, 300.0),
    "DoorFL": zeros,
    "DoorFR": zeros,
    "DoorRL": zeros,
    "DoorRR": zeros,
    "Trunk": zeros,
    "Hood": zeros,
    "Locked": (speed > 10.0).astype(int),
    "Headlights": const(headlights),
    "TurnLeft": ((steer > 90.0) * blink).astype(int),
    "TurnRight": ((steer < -90.0) * blink).astype(int),
    "BrakeLights": (brake > 0.0).astype(int),
    "Hazard": zeros,
    "CabinTemp": cabin,
    "TargetTemp": const(21.0),
    "FanSpeed": const(int(rng.integers(1, 6))),
    "AcOn": const(int(rng.integers(0, 2))),
    "Odometer": rng.uniform(1000.0, 150000.0) + distance,
    "TripDistance": distance,
    "CheckEngine": zeros,
    "LowFuel": (fuel < 10.0).astype(int),
    "AirbagReady": ones,
    "SeatbeltDriver": ones,
    "SeatbeltPassenger": const(int(rng.integers(0, 2))),
    "PassengerPresent": zeros,
  }
  return {name: np.asarray(values).tolist() for name, values in signals.items()}


def ecu_traffic(seconds: float, seed: int | Sequence[int], start: float = 0.0) -> list[tuple[float, int, dict]]:
  """The ECUs' periodic messages over [start, start + seconds): (timestamp s, frame ID, {signal: physical value}),
  in time order (ties by ID). Each message starts at a random phase of its cycle time and is sent at
  start + phase + k * cycle, +-JITTER_S (uniform, not accumulating); its signals are the driving model's at the last
  DRIVE_STEP_S step. Timestamps are rounded to 1 us. Deterministic in `seed` (an int or a sequence of ints)."""
  rng = _rng(seed)
  steps = int(np.ceil(seconds / DRIVE_STEP_S)) + 1
  state = _drive(steps, rng)
  schedule = []
  for message in sorted(database().messages, key=lambda m: m.frame_id):
    period = message.cycle_time / 1000.0
    phase = rng.uniform(0.0, period)
    nominal = phase + period * np.arange(int(np.ceil((seconds - phase) / period)))
    offsets = np.clip(nominal + rng.uniform(-JITTER_S, JITTER_S, len(nominal)), 0.0, seconds - 1e-6)
    names = [signal.name for signal in message.signals]
    schedule += [(offset, message.frame_id, names) for offset in offsets.tolist()]
  schedule.sort(key=lambda s: (s[0], s[1]))
  traffic = []
  for offset, frame_id, names in schedule:
    step = min(int(offset / DRIVE_STEP_S), steps - 1)
    traffic.append((round(start + offset, 6), frame_id, {name: state[name][step] for name in names}))
  return traffic


def attack_stretch(attack: str, seconds: float) -> tuple[float, float]:
  """The (start, end) offsets, from the start of its episode of `seconds`, of an attack's stretch: centred in the
  episode and ATTACK_FRACTION[attack] of it long. A replay re-sends, shifted by `start`, the genuine frames of
  [0, end - start) of the episode."""
  fraction = ATTACK_FRACTION[attack]
  begin = round((1.0 - fraction) / 2.0 * seconds, 6)
  return begin, round(begin + fraction * seconds, 6)


def _attack_frames(attack: str, start: float, seconds: float, genuine, rng: np.random.Generator):
  """The injected (timestamp, ID, data) of `attack` in the episode starting at `start`; `genuine` is the episode's
  ECU (timestamp, ID, data)."""
  begin, end = attack_stretch(attack, seconds)
  begin, end = start + begin, start + end
  if attack == "replay":
    shift = begin - start
    return [(round(t + shift, 6), i, d) for t, i, d in genuine if t < start + (end - begin)]
  period = {"dos": DOS_PERIOD_S, "fuzzy": FUZZY_PERIOD_S, "spoofing": SPOOF_PERIOD_S}[attack]
  times = [round(begin + k * period, 6) for k in range(int(np.ceil((end - begin) / period - 1e-9)))]
  if attack == "dos":
    return [(t, DOS_ID, DOS_PAYLOAD) for t in times]
  if attack == "spoofing":
    return [(t, SPOOF_ID, SPOOF_PAYLOAD) for t in times]
  ids = rng.integers(0, 0x800, len(times)).tolist()
  return [(t, i, rng.bytes(8)) for t, i in zip(times, ids)]


def simulate(seconds_per_episode: float, seed: int) -> list[tuple[can.Message, str]]:
  """A recording of the simulated bus: (frame, label) pairs in time order, label in LABELS.

  One episode per EPISODES entry, back to back: episode k covers [k * S, (k + 1) * S) for S = seconds_per_episode,
  its ECU traffic is `ecu_traffic(S, (seed, k), k * S)` and, but for the first (normal-only) episode, its attack
  EPISODES[k] runs over `attack_stretch`. All frames go through a python-can virtual bus (sender -> logger) in time
  order; the frames returned are those the logger received (channel CHANNEL, is_rx True, 11-bit IDs, DLC = len(data)).
  About (575 + attack rate) frames per simulated second.
  """
  import can  # pylint: disable=g-import-not-at-top

  if seconds_per_episode <= 0:
    raise ValueError(f"simulate: seconds_per_episode must be > 0, got {seconds_per_episode}")
  database_ = database()
  encoders = {m.frame_id: m.encode for m in database_.messages}
  timeline = []  # (timestamp, order, ID, data, label)
  for k, kind in enumerate(EPISODES):
    start = k * seconds_per_episode
    traffic = ecu_traffic(seconds_per_episode, (seed, k), start)
    genuine = [(t, frame_id, encoders[frame_id](signals)) for t, frame_id, signals in traffic]
    timeline += [(t, 0, i, d, "normal") for t, i, d in genuine]
    if kind != "normal":
      attack = _attack_frames(kind, start, seconds_per_episode, genuine, _rng((seed, k, 1)))
      timeline += [(t, 1, i, d, kind) for t, i, d in attack]
  timeline.sort(key=lambda f: (f[0], f[1]))

  channel = f"{CHANNEL}-simulated-{next(_BUS_CHANNELS)}"
  frames = []
  with (
    can.Bus(interface="virtual", channel=channel, preserve_timestamps=True) as ecus,
    can.Bus(interface="virtual", channel=channel, receive_own_messages=False) as logger,
  ):
    for t, _, frame_id, data, label in timeline:
      ecus.send(can.Message(timestamp=t, arbitration_id=frame_id, is_extended_id=False, data=data))
      received = logger.recv(timeout=0)
      if received is None or received.timestamp != t or received.arbitration_id != frame_id:
        raise RuntimeError(f"simulate: the virtual bus lost or reordered the frame at {t:.6f} s")
      received.channel = CHANNEL
      frames.append((received, label))
  return frames


def _readable_extensions() -> list[str]:
  from can.io.player import MESSAGE_READERS  # pylint: disable=g-import-not-at-top

  return sorted(MESSAGE_READERS)


def _log_suffix(path: str) -> str:
  """The log format's extension of `path` ('.log' for 'x.log' and 'x.log.gz'), lower case; '' if none."""
  suffixes = [s.lower() for s in pathlib.PurePath(path).suffixes]
  if len(suffixes) >= 2 and suffixes[-1] == ".gz":
    return suffixes[-2]
  return suffixes[-1] if suffixes else ""


def _unreadable(path, reason: str) -> ValueError:
  reason = " ".join(reason.split())  # one line
  reason = reason if len(reason) <= 200 else reason[:197] + "..."
  return ValueError(
    f"{path}: python-can cannot read it as a CAN log ({reason}); allowed: a python-can log file with extension "
    f"{', '.join(_readable_extensions())} (or one of these + .gz)"
  )


def write_log(path: str | os.PathLike, frames: Sequence[tuple[can.Message, str | None]]) -> None:
  """Writes the frames to a python-can log (format by extension; `.log` or `.csv` keep timestamps exactly to 1 us)
  and, when every label is set, their labels to `path + ".labels"`, one per line in frame order (else no such file).
  """
  import can  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if _log_suffix(path) not in _readable_extensions():
    raise ValueError(
      f"{path}: write_log writes only logs python-can reads back, not extension {_log_suffix(path)!r}; allowed: "
      f"{', '.join(_readable_extensions())} (or one of these + .gz)"
    )
  labels = [label for _, label in frames]
  if any(label is not None and label not in LABELS for label in labels):
    raise ValueError(f"write_log: labels must be in {LABELS} or None, got {sorted(set(labels) - set(LABELS))}")
  with can.Logger(path) as writer:
    for message, _ in frames:
      writer.on_message_received(message)
  if labels and all(label is not None for label in labels):
    with open(path + ".labels", "w", encoding="utf-8") as f:
      f.write("".join(f"{label}\n" for label in labels))
  elif os.path.exists(path + ".labels"):
    os.remove(path + ".labels")  # a stale sidecar of an earlier log


def read_log(path: str | os.PathLike, labels: str | os.PathLike | None = None) -> list[tuple[can.Message, str | None]]:
  """The (frame, label) pairs of a python-can log, in file order.

  Args:
    path: a log python-can reads by its extension (.asc, .blf, .csv, .db, .log, .mf4, .trc, or these + .gz).
    labels: the labels file (one label of LABELS per line, one line per frame); None = `path + ".labels"` if it
      exists, else every label is None.

  Raises ValueError (one line) when python-can cannot read the file (unknown extension, garbage, no frames) or the
  labels do not match the frames.
  """
  import can  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such CAN log file")
  if _log_suffix(path) not in _readable_extensions():
    raise _unreadable(path, f"unknown extension {_log_suffix(path)!r}")
  try:
    with can.LogReader(path) as reader:
      messages = list(reader)
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e
  if not messages:
    raise _unreadable(path, "no CAN frames in it")
  if labels is None:
    labels = path + ".labels" if os.path.isfile(path + ".labels") else None
  if labels is None:
    return [(message, None) for message in messages]
  with open(labels, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  if len(names) != len(messages):
    raise ValueError(
      f"{os.fspath(labels)}: {len(names)} labels for the {len(messages)} frames of {path}; allowed: one label per "
      "frame, one per line"
    )
  if not set(names) <= set(LABELS):
    raise ValueError(f"{os.fspath(labels)}: labels {sorted(set(names) - set(LABELS))} are not in {LABELS}")
  return list(zip(messages, names))


def windows_from_log(
  path: str | os.PathLike, window: int = WINDOW, unknown: str = "error"
) -> tuple[np.ndarray, np.ndarray | None]:
  """Cuts a python-can log into consecutive non-overlapping windows of `window` CAN IDs (stride = window; the
  trailing partial window is dropped; error frames are skipped).

  Args:
    path: a python-can log (see `read_log`), with or without a `.labels` sidecar.
    window: frames per window.
    unknown: what to do with a frame whose ID is not in the DBC (or is a 29-bit ID): "error" raises a one-line
      ValueError naming the first such frame (0-based among the file's frames); "map" maps it to UNKNOWN (1).

  Returns:
    ids: int32 [N, window], vocabulary indices (see ID_VOCABULARY);
    labels: int32 [N], indices into LABELS (the attack in the window, 0 = normal), or None when the log has no labels.
  """
  if unknown not in ("error", "map"):
    raise ValueError(f"windows_from_log: unknown={unknown!r}; allowed: 'error', 'map'")
  if window < 1:
    raise ValueError(f"windows_from_log: window must be >= 1, got {window}")
  ids, frame_labels = [], []
  for n, (message, label) in enumerate(read_log(path)):
    if message.is_error_frame:
      continue
    index = None if message.is_extended_id else ID_INDEX.get(message.arbitration_id)
    if index is None:
      if unknown == "error":
        digits = 8 if message.is_extended_id else 3
        examples = ", ".join(f"0x{i:03X}" for i in _DBC_IDS[:2])
        raise ValueError(
          f"{os.fspath(path)}: frame {n} has CAN ID 0x{message.arbitration_id:0{digits}X}, which is not in the "
          f"message database ({len(_DBC_IDS)} known IDs, e.g. {examples}); allowed: IDs of the database, or "
          "unknown='map' to map them to UNKNOWN"
        )
      index = UNKNOWN
    ids.append(index)
    frame_labels.append(None if label is None else LABELS.index(label))
  count = len(ids) // window
  ids = np.asarray(ids[: count * window], np.int32).reshape(count, window)
  if not frame_labels or frame_labels[0] is None:
    return ids, None
  per_frame = np.asarray(frame_labels[: count * window], np.int32).reshape(count, window)
  attacks = (per_frame[:, :, None] == np.arange(1, len(LABELS))).sum(axis=1)  # [N, attacks]
  labels = np.where(attacks.sum(axis=1) > 0, attacks.argmax(axis=1) + 1, 0).astype(np.int32)
  return ids, labels


class CanBus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Windows of CAN IDs from a simulated car's bus with DoS, fuzzy, spoofing and replay attacks (module docstring)."""

  name = "can_bus"
  # No checksums file: there is nothing to download (TFDS would otherwise locate one next to this module).
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Simulated 17-message car via python-can's virtual bus; DoS/fuzzy/spoofing/replay episodes; windows of "
    "32 IDs; train and test from separate recordings (seeds 0 and 1)."
  }
  FORMAT_INFO = {"vocab_size": VOCAB_SIZE, "window": WINDOW}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "ids": tfds.features.Tensor(shape=(WINDOW,), dtype=np.int32),
          "label": tfds.features.ClassLabel(names=LABELS),
        }
      ),
      supervised_keys=("ids", "label"),
    )

  def _split_generators(self, dl_manager):
    # Nothing to download: the recordings are simulated, written as logs and read back as a user's log would be.
    directory = os.path.join(os.fspath(dl_manager.download_dir), "can_bus")
    os.makedirs(directory, exist_ok=True)
    splits = {}
    for split, seconds, seed in (
      ("train", TRAIN_SECONDS_PER_EPISODE, TRAIN_SEED),
      ("test", TEST_SECONDS_PER_EPISODE, TEST_SEED),
    ):
      path = os.path.join(directory, f"{split}_seed{seed}.log")
      write_log(path, simulate(seconds, seed))
      ids, labels = windows_from_log(path, unknown="map")
      splits[split] = self._generate_examples(ids, labels)
    return splits

  def _generate_examples(self, ids: np.ndarray, labels: np.ndarray):
    for i, (window, label) in enumerate(zip(ids, labels)):
      yield i, {"ids": window, "label": int(label)}
