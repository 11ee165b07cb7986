"""One forward and its joint loss, with every argument that reaches the loss written out.

Two special paths, both giving the same loss as the plain forward:

* V2T prefill (`reuse_clean_video`): a sample whose noisy text reads a clean video, when nothing
  that video's own pass touches is trained, runs the video through the cached sampler's `prefill`
  without autograd and only its text through `step_text`.
* The text-alone forward: V2T samples that drop the video (the text guidance branch) are predicted
  from the text alone. Under FSDP every rank must make the same forward calls, so a rank without
  such samples runs that forward on one sample and adds it with weight zero.
"""

from __future__ import annotations

import torch

from ..flow.losses import JointLoss, joint_loss
from ..flow.paths import MixtureTextPath, noise_level_to_timestep
from ..precision import autocast
from .batches import NoisedBatch


def can_reuse_clean_video(model, distributed: bool, compiled: bool) -> bool:
    """Whether V2T samples may take the prefill path: only text parameters train, the policy
    allows a video cache, and the model is neither sharded (FSDP2 gathers parameters only inside
    forward) nor compiled (which would specialise on every cache layer and batch split)."""
    if distributed or compiled or not model.has_text_stream or not model.supports_cache("video"):
        return False
    return not any(p.requires_grad for name, p in model.named_parameters() if model.parameter_group(name) != "text")


class LossStep:
    """`step(nb, normalizers, alone_forward) -> (loss, JointLoss)` for one (micro-)batch."""

    def __init__(self, model, text_path: MixtureTextPath | None, flow_config, device: torch.device,
                 bf16: bool = False, reuse_clean_video: bool = False):
        self.model, self.text_path, self.flow = model, text_path, flow_config
        self.device, self.bf16 = device, bf16
        self.reuse_clean_video = reuse_clean_video

    def __call__(self, nb: NoisedBatch, normalizers: torch.Tensor, alone_forward: bool) -> tuple[torch.Tensor, JointLoss]:
        """Joint loss of `nb`, normalised by the global counts `normalizers` ([video, text])."""
        dev = self.device
        text = None if nb.text is None else nb.text.to(dev)
        text_timestep = None if text is None else noise_level_to_timestep(nb.s_text).to(dev)
        condition = nb.condition.to(dev)
        dummy = None
        with autocast(dev, self.bf16):
            velocity, logits = self._outputs(nb, text, text_timestep, condition)
            if alone_forward:  # text guidance branch: the same text with no video at all
                keep = nb.drop_video.to(dev)
                if keep.any():
                    _, alone = self.model(None, text[keep], None, text_timestep[keep], condition[keep])
                    logits = logits.clone()
                    logits[keep] = alone
                else:
                    _, dummy = self.model(None, text[:1], None, text_timestep[:1], condition[:1])
        has_text = logits is not None
        result = joint_loss(velocity=velocity, video_target=nb.video_target.to(dev),
                            video_noise_level=nb.s_video.to(dev), video_normalizer=normalizers[0],
                            logits=logits, text_target=nb.text_target.to(dev) if has_text else None,
                            text_noisy=text, text_noise_level=nb.s_text.to(dev) if has_text else None,
                            path=self.text_path, text_loss=self.flow.text_loss,
                            text_weight=self.flow.text_loss_weight, text_normalizer=normalizers[1])
        loss = result.loss if dummy is None else result.loss + 0.0 * dummy.float().sum()
        return loss, result

    def _outputs(self, nb: NoisedBatch, text, text_timestep, condition):
        """(velocity, logits) of the whole batch; with `reuse_clean_video` the samples whose noisy
        text reads a clean video go through prefill + step_text (velocity zero there: no video loss)."""
        video = nb.video.to(self.device)
        video_timestep = noise_level_to_timestep(nb.s_video).to(self.device)
        readers = None
        if self.reuse_clean_video and text is not None:
            readers = ((nb.s_video == 0) & (nb.s_text > 0) & ~nb.drop_video).to(self.device)
        if readers is None or not readers.any():
            return self.model(video, text, video_timestep, text_timestep, condition)
        with torch.no_grad():
            cache = self.model.prefill("video", video[readers], condition=condition[readers])
        read_logits = self.model.step_text(text[readers], text_timestep[readers], cache)
        velocity = torch.zeros(video.shape, dtype=torch.float32, device=video.device)
        logits = read_logits.new_zeros((video.shape[0], *read_logits.shape[1:]))
        logits[readers] = read_logits
        rest = ~readers
        if rest.any():
            velocity[rest], logits[rest] = self.model(video[rest], text[rest], video_timestep[rest],
                                                      text_timestep[rest], condition[rest])
        return velocity, logits
