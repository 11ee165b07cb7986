"""End to end on the real unified transformer: a tiny model overfits one (video, text) pair with the
joint loss, after which T2V reconstructs the video and V2T reproduces the text exactly."""

import torch

from univigu.config import TransformerConfig
from univigu.flow.losses import joint_loss
from univigu.flow.paths import MixtureTextPath, RectifiedFlowPath
from univigu.flow.samplers import TextSamplerOptions, VideoSamplerOptions, sample_text, sample_video
from univigu.models.transformer import UniViGUTransformer

EOS, PAD = 1, 0
TARGET = torch.tensor([[5, 7, 3, 9, EOS, PAD, PAD, PAD]])


def test_tiny_model_overfits_one_pair_then_t2v_and_v2t_recover_it():
    torch.manual_seed(0)
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                            text_dim=8, ffn_dim=64, num_layers=2, vocab_size=12, text_length=8)
    model = UniViGUTransformer(cfg)
    video = torch.randn(1, 4, 1, 4, 4).clamp(-2, 2)
    condition = torch.randn(1, 3, 8)
    video_path = RectifiedFlowPath()
    text_path = MixtureTextPath(vocab_size=12, source="mask", special_ids=(EOS, PAD))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    batch = 16
    for _ in range(400):
        # Half the samples are T2V (text clean, video noisy), half V2T (video clean, text noisy).
        t2v = torch.arange(batch) < batch // 2
        s_video = torch.where(t2v, torch.rand(batch, generator=gen), torch.zeros(batch))
        s_text = torch.where(t2v, torch.zeros(batch), torch.rand(batch, generator=gen).clamp(min=0.02))
        v = video_path.sample(video.expand(batch, -1, -1, -1, -1), s_video, generator=gen)
        y = text_path.sample(TARGET.expand(batch, -1), s_text, generator=gen)
        velocity, logits = model(v.noisy, y.noisy, s_video * 1000, s_text * 1000, condition.expand(batch, -1, -1))
        loss = joint_loss(velocity=velocity, video_target=v.target, video_noise_level=s_video, logits=logits,
                          text_target=TARGET.expand(batch, -1), text_noisy=y.noisy, text_noise_level=s_text,
                          path=text_path).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        generated = sample_video(model, video.shape, condition, text=TARGET, text_path=text_path,
                                 options=VideoSamplerOptions(steps=30, solver="heun", shift=1.0, guidance_scale=1.0), seeds=[0]).video
        caption = sample_text(model, video, condition, text_path, 8, eos_id=EOS,
                              options=TextSamplerOptions(steps=8, sampler="euler"), seeds=[0])
    assert torch.mean((generated - video) ** 2) < 0.05 * video.var()
    assert caption.tokens.tolist() == TARGET.tolist()
    assert caption.sequences == [[5, 7, 3, 9]]
