"""The unified flow: probability paths, losses and samplers (DESIGN.md section 4)."""

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
from .samplers import (
    JointSample,
    JointSamplerOptions,
    RandomSource,
    TextSample,
    TextSamplerOptions,
    VideoODESolver,
    VideoSample,
    VideoSamplerOptions,
    confidence_step,
    decode_tokens,
    discrete_euler_step,
    guide,
    guide_logits,
    sample_categorical,
    sample_joint,
    sample_text,
    sample_video,
    supports_cache,
)
from .verify import pick_lowest, video_flow_loss

__all__ = [name for name in dir() if not name.startswith("_")]
