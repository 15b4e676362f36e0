"""The CPU demo learns from its judge (`configs/demo.py`, shortened): the trained tiny editor, rewarded by the
trained tiny Qwen2.5-VL judge's digit logits (filtering, NFT, EMA as in the paper's run), raises the judge's reward
on the held-out split, and the independent pixel check of the same held-out edits does not get worse."""

import numpy as np
from helpers import override

from configs import demo
from editr1_jax import train_loop

EPOCHS = 20
# The judge's mean score of the 64 held-out edits (EMA weights, the same noise every time) after EPOCHS, minus before.
# Measured here (2 cores, this test's settings, 2026-12-07), seeds 0 / 1 / 2:
#   method:  reward +0.062 / +0.065 / +0.040, held-out accuracy +5 / +2 / +4 of 64 items
#   control (`advantage.mode = zero`: no reward signal in the update): reward -0.002 / +0.006 / -0.001,
#            accuracy 0 / 0 / +2 items
# (an earlier build, blocks unrolled: method +0.065 / +0.068 / +0.022, control +0.006 / -0.002). A CPU with other
# float rounding takes another trajectory, like another seed. REWARD_GAIN lies 3x above the control's largest drift
# and 2x below the method's smallest gain (1.1x below the unrolled build's seed 2): the control fails it in every
# seed. Accuracy moves in steps of 1/64 and the control gained 2 items in one seed, as much as the method in
# another: no threshold on 64 items tells them apart, so accuracy is held to the claim it can support, that
# chasing the judge's reward does not cost the independent pixel check anything (the paper's reward-hacking
# concern); the reward threshold is what the control fails.
REWARD_GAIN = 0.02


def demo_config(**overrides):
  c = demo.get_config()
  c.num_epochs, c.checkpoint_every, c.eval_every, c.log_images_every = EPOCHS, EPOCHS, 0, 0
  return override(c, **overrides)


def test_demo_raises_the_judge_reward_without_losing_accuracy(tmp_path):
  config = demo_config()
  trainer = train_loop.Trainer(config, str(tmp_path / "run"))
  before = trainer.evaluate()  # the EMA weights are the starting weights; fixed noise for every evaluation
  rewards = [trainer.run_epoch()["reward/mean"] for _ in range(EPOCHS)]
  after = trainer.evaluate()
  print(f"eval reward {before['eval/reward_mean']:.4f} -> {after['eval/reward_mean']:.4f}, accuracy "
        f"{before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}; rollout reward by epoch {np.round(rewards, 3)}")
  assert after["eval/reward_mean"] > before["eval/reward_mean"] + REWARD_GAIN
  assert after["eval/accuracy"] >= before["eval/accuracy"]
