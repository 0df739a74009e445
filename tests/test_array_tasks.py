"""The shipped NetMamba and LSF-IDM configs through the engine on their embedded 'arrays' datasets (loopback traffic,
simulated CAN bus): pre-training then fine-tuning from it, and a teacher run then its distillation into a student.
A few steps each on one device with small batches; what is checked is the plumbing between the runs: the fine-tuned
classifier starts from the pre-trained encoder, the frozen parts stay as loaded, and the distillation run's teacher
scores exactly as the teacher run does."""

import jax
import numpy as np
import pytest

from configs import lsf_idm_can, netmamba_traffic
from zoo.data import dataset_info, make_iterator
from zoo.engine import trainer

ONE = jax.devices()[:1]


def _tiny(config, steps=2):
  config.train.update(steps=steps, batch_size=8, eval_every_steps=0, eval_batches=2, log_every_steps=1)
  config.checkpoint.update(every_steps=0, async_save=False)
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  return config


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_arrays_format_batches():
  info = dataset_info({"name": "can_bus"})
  assert info["format"] == "arrays" and info["features"] == {"ids": ((32,), "int32"), "label": ((), "int32")}
  assert info["vocab_size"] == lsf_idm_can.VOCAB_SIZE and len(info["label_names"]) == 5
  batch = next(make_iterator({"name": "loopback_traffic"}, split="test", global_batch_size=4, seed=0))
  assert batch["packets"].shape == (4, 5, 320) and batch["packets"].dtype == np.int32
  assert 0 <= batch["packets"].min() and batch["packets"].max() <= 255 and batch["label"].dtype == np.int32


def test_netmamba_pretrain_then_finetune(tmp_path):
  model = dict(netmamba_traffic.MODEL, embed_dim=16, depth=1, decoder_dim=8, header_bytes=8, payload_bytes=8)
  pre = _tiny(netmamba_traffic.get_config("pretrain"))
  pre.model.update(model)
  pre_state = trainer.train(pre, str(tmp_path / "pre"), progress=False, devices=ONE)
  _, pre_results, _ = trainer.evaluate(pre, str(tmp_path / "pre"), devices=ONE)
  assert np.isfinite(pre_results["loss"]) and pre_results["loss"] > 0  # the MSE on the masked strides

  fine = _tiny(netmamba_traffic.get_config("finetune"), steps=1)
  fine.model.update(model)
  fine.init_from = str(tmp_path / "pre")
  fine.optimizer.warmup_steps = 5  # the one step runs at learning rate 0: the parameters stay as loaded
  state = trainer.train(fine, str(tmp_path / "fine"), progress=False, devices=ONE)
  loaded, trained = _flat(pre_state.params), {**_flat(state.params), **_flat(state.frozen)}
  assert set(loaded) == set(trained)
  for key in loaded:  # every parameter, the classifier head included, starts from the pre-training run
    np.testing.assert_array_equal(trained[key], loaded[key], err_msg=key)
  assert set(_flat(state.frozen)) == {k for k in loaded if k.startswith(("['decoder", "['mask_token"))}
  _, results, _ = trainer.evaluate(fine, str(tmp_path / "fine"), devices=ONE)
  assert {"accuracy", "f1_macro"} <= set(results) and 0 <= results["f1_macro"] <= 1


@pytest.mark.parametrize("alpha", [0.5])
def test_lsf_idm_teacher_then_distilled_student(tmp_path, alpha):
  teacher_model = dict(lsf_idm_can.TEACHER, num_layers=1, embed_dim=16, mlp_dim=16)
  teacher = _tiny(lsf_idm_can.get_config("teacher"))
  teacher.model.update(teacher_model)
  teacher_state = trainer.train(teacher, str(tmp_path / "teacher"), progress=False, devices=ONE)
  _, teacher_results, _ = trainer.evaluate(teacher, str(tmp_path / "teacher"), devices=ONE)

  student = _tiny(lsf_idm_can.get_config("student"))
  student.model.teacher.update(teacher_model)
  student.model.student.update(hidden_dim=8, embed_dim=8)
  student.init_from = {"teacher": str(tmp_path / "teacher")}
  student.task_options.alpha = alpha
  state = trainer.train(student, str(tmp_path / "student"), progress=False, devices=ONE)
  frozen = _flat(state.frozen)
  assert (
    frozen and all(k.startswith("['teacher']") for k in frozen) and not any("teacher" in k for k in _flat(state.params))
  )
  for key, value in _flat(teacher_state.params).items():
    np.testing.assert_array_equal(frozen["['teacher']" + key], value, err_msg=key)
  _, results, _ = trainer.evaluate(student, str(tmp_path / "student"), devices=ONE)
  assert results["teacher_f1_macro"] == pytest.approx(teacher_results["f1_macro"], abs=1e-6)
  assert results["teacher_accuracy"] == pytest.approx(teacher_results["accuracy"], abs=1e-6)
  assert {"ce", "kd", "f1_macro"} <= set(results)
