"""The unified flow (DESIGN.md section 4), one concept per module: paths (and the time
conventions), losses, sampler options, random sources, guidance and the model caller, video
solvers, categorical draws, text updates, the three task samplers, and caption verification."""

from .losses import (
    JointLoss,
    active_modalities,
    apply_carry_over,
    count_loss_terms,
    generalized_kl,
    joint_loss,
    text_cross_entropy,
    velocity_mse,
)
from .paths import (
    TIMESTEP_SCALE,
    FlowError,
    MixtureTextPath,
    NoiseLevelSampler,
    RectifiedFlowPath,
    TextPathSample,
    VideoPathSample,
    commit_probability,
    fm_time_to_noise_level,
    jump_rate,
    kappa,
    kappa_derivative,
    kappa_inverse,
    mask_probability,
    noise_level_to_fm_time,
    noise_level_to_timestep,
    sampling_grid,
    shift_noise_level,
    timestep_to_noise_level,
    unshift_noise_level,
)
from .categorical import draw_categorical, sample_categorical
from .guidance import ModelCaller, guide, guide_logits, supports_cache
from .options import JointSamplerOptions, TextSamplerOptions, VideoSamplerOptions
from .randomness import RandomSource
from .samplers import JointSample, TextSample, VideoSample, sample_joint, sample_text, sample_video
from .text_updates import TextUpdater, confidence_step, decode_tokens, discrete_euler_step
from .video_solvers import VideoODESolver
from .verify import Captioner, pick_lowest, video_flow_loss

__all__ = [name for name in dir() if not name.startswith("_")]
