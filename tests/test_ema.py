"""LitEma: reference buffer names, the warm-up decay formula, copy/store/restore."""
import pytest
import torch
from torch import nn

from ldm.modules.ema import LitEma


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_buffers_named_as_reference():
    ema = LitEma(TwoLayer(), decay=0.999)
    assert list(ema.state_dict()) == ["decay", "num_updates", "body0weight", "body0bias", "body1weight", "body1bias"]
    assert ema.decay.dtype == torch.float32 and ema.num_updates.dtype == torch.int32
    assert ema.num_updates.item() == 0
    assert LitEma(TwoLayer(), use_num_upates=False).num_updates.item() == -1
    with pytest.raises(ValueError, match="between 0 and 1"):
        LitEma(TwoLayer(), decay=1.5)


@pytest.mark.parametrize("use_num_updates", [True, False])
def test_update_formula(use_num_updates):
    torch.manual_seed(0)
    model = TwoLayer()
    ema = LitEma(model, decay=0.9, use_num_upates=use_num_updates)
    shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(1, 16):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema(model)
        # With the warm-up the decay is min(decay, (1 + n) / (10 + n)): 2/11, 3/12, ... until it reaches 0.9.
        decay = min(0.9, (1 + step) / (10 + step)) if use_num_updates else 0.9
        for name, p in model.named_parameters():
            if p.requires_grad:
                shadow[name] = decay * shadow[name] + (1 - decay) * p.detach()
                torch.testing.assert_close(getattr(ema, name.replace(".", "")), shadow[name])
    assert ema.num_updates.item() == (15 if use_num_updates else -1)


def test_copy_to_store_restore_round_trip():
    torch.manual_seed(0)
    model = TwoLayer()
    ema = LitEma(model, decay=0.5, use_num_upates=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    ema.store(model.parameters())
    ema.copy_to(model)
    torch.testing.assert_close(model.body[0].weight, ema.body0weight)
    assert not torch.equal(model.body[0].weight, trained["body.0.weight"])
    assert torch.equal(model.frozen.weight, trained["frozen.weight"])  # frozen parameters are not averaged
    ema.restore(model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model.parameters())  # nothing stored any more


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = TwoLayer()
    ema = LitEma(model, decay=0.99)
    for _ in range(3):
        ema(model)
    resumed = LitEma(TwoLayer(), decay=0.99)
    resumed.load_state_dict(ema.state_dict())
    ema(model)
    resumed(model)
    for (k, a), b in zip(ema.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
