"""triton_bn.fuse: the fused model against the unfused torch model (outputs, gradients, training
steps, state), on hand-written blocks covering every matched spelling, a DenseNet look-alike, and
real third-party models (Hugging Face transformers ResNet, MobileNetV2, EfficientNet; random
weights from small configs)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from torch import fx, nn

from triton_bn import BatchNorm2d, FuseReport, fuse, tuning
from triton_bn.bench.model_runner import CPU_SMOKE_KNOBS
from triton_bn.fuse import FusedSite
from triton_bn.modules import _TritonBatchNorm

F32 = TOL[torch.float32]


def _randomize(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and running statistics (not the identity defaults)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: one in-place ReLU module used three times, ``out += identity``."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = 2 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Spellings(nn.Module):
    """The other spellings: F.relu(inplace), torch.relu, x.relu_(), torch.add, shortcut + bn."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(5))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(5))
        self.idn = nn.Identity()

    def forward(self, x):
        c, b = self.convs, self.bns
        y = F.relu(b[0](c[0](x)), inplace=True)
        y = torch.relu(self.idn(b[1](c[1](y))))
        y = b[2](c[2](y)).relu_()
        z = F.relu(torch.add(b[3](c[3](y)), y))  # shortcut y is also conv3's input
        return torch.relu(z + self.idn(b[4](c[4](z))))  # BN as the add's second operand


class NotFusable(nn.Module):
    """BN outputs with other users, a ReLU6, a BN called twice: nothing may be fused."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.bn1(x)
        a = self.relu(y) + y  # BN output read by the ReLU and the add
        b = F.relu6(self.bn2(self.conv(a)))
        return self.relu(self.bn3(b)) + self.bn3(a)  # bn3 called twice


class IaddIntoShortcut(nn.Module):
    """``shortcut += bn(x)``, then the shortcut is read again: the add may not be fused (torch.fx
    records ``+=`` on a traced value as an out-of-place add whose result has two users)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        s = self.conv(x)
        s += self.bn(self.conv(x))
        out = F.relu(s)
        return out * s


def _run(model, x, dy):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _compare(ref_model, x, residual="all"):
    """Fuses a copy of ``ref_model``; compares output, input/parameter gradients and running
    statistics with ``ref_model`` (torch's layers); returns (fused model, report)."""
    model, report = fuse(copy.deepcopy(ref_model), residual=residual, return_report=True)
    dy = torch.randn_like(ref_model(x.clone()))  # also moves the running stats once, in both
    model(x.clone())
    y_ref, dx_ref, g_ref = _run(ref_model, x, dy)
    y, dx, g = _run(model, x, dy)
    torch.testing.assert_close(y, y_ref, **F32)
    torch.testing.assert_close(dx, dx_ref, **F32)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(model.state_dict(), ref_model.state_dict(), **F32)
    return model, report


@pytest.mark.parametrize("stride,cin", [(1, 8), (2, 4)], ids=["identity", "downsample"])
def test_bottleneck_matches_torch(stride, cin):
    block = _randomize(Bottleneck(cin, 4, stride)).train()
    model, report = _compare(block, torch.randn(2, cin, 6, 5), residual="all")
    assert isinstance(model, fx.GraphModule)
    assert {(s.name, s.pattern) for s in report.fused} == {
        ("bn1", "relu"), ("bn2", "relu"), ("bn3", "add+relu")}
    assert [n for n, _ in report.unfused] == (["downsample.1"] if stride == 2 else [])
    # no ReLU and no add left in the graph: bn3 got the shortcut
    targets = [n.target for n in model.graph.nodes]
    assert "relu" not in targets and not any("add" in str(t) for t in targets)
    assert model.bn3.activation == "relu" and isinstance(model.bn3, BatchNorm2d)


def test_downsample_add_kept_with_residual_saved():
    """residual='saved': the downsampling shortcut (a BN output nothing else saves) is not fused;
    by default it is."""
    block = _randomize(Bottleneck(4, 4, 2)).train()
    _, report = _compare(block, torch.randn(2, 4, 6, 6), residual="saved")
    assert {s.name for s in report.fused} == {"bn1", "bn2"}
    assert dict(report.unfused).keys() == {"bn3", "downsample.1"}
    assert "saved" in dict(report.unfused)["bn3"]
    modules = dict(fuse(copy.deepcopy(block), residual="saved").named_modules())
    assert isinstance(modules["bn3"], _TritonBatchNorm)
    assert dict(fuse(copy.deepcopy(block)).named_modules())["bn3"].activation == "relu"


def test_spellings_all_fused():
    _model, report = _compare(_randomize(Spellings(3)).train(), torch.randn(3, 3, 5, 4))
    assert sorted((s.name, s.pattern) for s in report.fused) == [
        ("bns.0", "relu"), ("bns.1", "relu"), ("bns.2", "relu"), ("bns.3", "add+relu"),
        ("bns.4", "add+relu")]
    assert report.unfused == []


def test_not_fusable_left_alone_and_equivalent():
    model, report = _compare(_randomize(NotFusable(3)).train(), torch.randn(2, 3, 4, 4))
    assert report.fused == []
    assert not isinstance(model, fx.GraphModule) and type(model) is NotFusable
    reasons = dict(report.unfused)
    assert "several" in reasons["bn1"] and "called 2 times" in reasons["bn3"]
    assert "relu6" in reasons["bn2"]
    assert all(isinstance(m, BatchNorm2d) and m.activation is None
               for m in (model.bn1, model.bn2, model.bn3))  # converted as convert_model does


def test_iadd_into_shortcut_read_later_not_fused():
    _, report = _compare(_randomize(IaddIntoShortcut(3)).train(), torch.randn(2, 3, 4, 4),
                         residual="all")
    assert report.fused == [] and "several" in dict(report.unfused)["bn"]


def test_eval_mode_kept_and_parameters_shared():
    block = _randomize(Bottleneck(8, 4)).eval()
    bn_tensors = {k: v for k, v in block.state_dict().items()}
    model = fuse(block)
    assert not model.training and not model.bn3.training
    for k, v in model.state_dict().items():
        assert v is bn_tensors[k] or v.data_ptr() == bn_tensors[k].data_ptr(), k
    assert list(model.state_dict()) == list(bn_tensors)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(model(x.clone()), Bottleneck.forward(block, x.clone()), **F32)


class Untraceable(nn.Module):
    """Data-dependent control flow around two traceable blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Bottleneck(8, 4), Bottleneck(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_untraceable_parent_fuses_children():
    ref = _randomize(Untraceable()).train()
    model, report = _compare(ref, torch.randn(2, 8, 4, 4).abs())
    assert type(model) is Untraceable and isinstance(model.a, fx.GraphModule)
    assert [n for n, _ in report.untraced] == [""] and "TraceError" in report.untraced[0][1]
    assert len(report.fused) == 6 and "fused 6 of 6" in str(report)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse(torch.randn(2))
    with pytest.raises(ValueError, match="residual must be one of"):
        fuse(nn.Sequential(), residual="yes")


def test_fused_triton_layer_not_refused():
    """A triton_bn layer without activation is fused too; the original object is untouched."""
    bn = BatchNorm2d(3)
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.ReLU())
    model, report = fuse(seq, return_report=True)
    assert [s.name for s in report.fused] == ["1"] and bn.activation is None
    assert getattr(model, "1").weight is bn.weight and getattr(model, "1").activation == "relu"


# --- a real third-party ResNet (Hugging Face transformers) -----------------------------------

transformers = pytest.importorskip("transformers")


def _hf_resnet():
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 12, 16], depths=[2, 1, 1],
                                    layer_type="bottleneck", num_labels=5)
    return _randomize(transformers.ResNetForImageClassification(cfg)).train()


def test_hf_resnet_trains_like_torch():
    """Converted and fused, 3 SGD steps: the same losses and parameter updates as torch's."""
    ref = _hf_resnet()
    model, report = fuse(copy.deepcopy(ref), return_report=True)
    assert type(model) is type(ref) and model.training
    assert list(model.state_dict()) == list(ref.state_dict())
    # stem + 2 per block; every block's add: stage 0's identity blocks (8 -> 8 channels, stride
    # 1) and the downsampling blocks of stages 1 and 2 (residual="all", the default)
    assert report.count("relu") == 9 and sorted(s.name for s in report.fused
                                                if s.pattern == "add+relu") == [
        f"resnet.encoder.stages.{i}.layers.{j}.layer.2.normalization"
        for i, j in ((0, 0), (0, 1), (1, 0), (2, 0))]
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    x, y = torch.randn(3, 3, 24, 24), torch.randint(0, 5, (3,))
    losses = {}
    for tag, m in (("torch", ref), ("fused", model)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        losses[tag] = []
        with tuning.override(**CPU_SMOKE_KNOBS):  # channel tiles: fewer interpreter programs
            for _ in range(3):
                loss = F.cross_entropy(m(pixel_values=x).logits, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[tag].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["torch"]),
                               atol=1e-4, rtol=1e-4)
    assert losses["torch"][0] != losses["torch"][2]  # the steps did change the model
    new_ref, new = ref.state_dict(), model.state_dict()
    for k, old in before.items():
        if old.is_floating_point():
            torch.testing.assert_close(new[k] - old, new_ref[k] - old, atol=2e-4, rtol=2e-3, msg=k)
        else:
            assert torch.equal(new[k], new_ref[k]), k
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, ref(pixel_values=x).logits,
                                   atol=1e-4, rtol=1e-4)


def test_fused_block_under_torch_compile():
    """The fused GraphModule compiles without graph breaks (triton_bn's custom operators) and
    matches torch's block, output and gradients."""
    ref = _randomize(Bottleneck(8, 4)).train()
    fused = fuse(copy.deepcopy(ref), residual="all")
    compiled = torch.compile(fused, fullgraph=True)
    x, dy = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    y_ref, dx_ref, g_ref = _run(ref, x, dy)
    y, dx, g = _run(compiled, x, dy)
    torch.testing.assert_close(y, y_ref, **F32)
    torch.testing.assert_close(dx, dx_ref, **F32)
    g = {k.removeprefix("_orig_mod."): v for k, v in g.items()}
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-4, rtol=1e-4, msg=name)


class ShortcutIsBNInput(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(x) + x)  # the BN keeps x for backward: fused by default


def test_shortcut_saved_by_the_bn_itself_is_fused():
    _, report = _compare(_randomize(ShortcutIsBNInput(3)).train(), torch.randn(2, 3, 4, 4))
    assert report.fused == [FusedSite("bn", "add+relu")]


# --- more third-party models: Hugging Face MobileNetV2 and EfficientNet, a DenseNet look-alike ---


F64_MODEL = {"rtol": 1e-9, "atol": 1e-9}  # float64 through a dozen layers, gradients up to ~100


def _compare_parts(ref, model, parts, x, tol):
    """Runs ``parts`` (names of submodules applied in sequence, as the model does) of the torch
    and the fused model in training mode; compares outputs, input and parameter gradients and
    running statistics. The fused model runs with the CPU smoke's plans (channel tiles: seconds
    instead of minutes in the interpreter)."""
    dy = None
    results = []
    for m in (ref, model):
        xa = x.clone().requires_grad_()
        with tuning.override(**(CPU_SMOKE_KNOBS if m is model else {})):
            h = xa
            for name in parts:
                h = m.get_submodule(name)(h)
            if hasattr(h, "logits"):
                h = h.logits
            dy = torch.randn_like(h) if dy is None else dy
            h.backward(dy)
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((h.detach(), xa.grad, grads))
    (y_ref, dx_ref, g_ref), (y, dx, g) = results
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert g.keys() == g_ref.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **tol, msg=name)
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), **tol)


@pytest.mark.parametrize("act", ["relu6", "relu"])
def test_hf_mobilenet_v2_fused_matches_torch(act):
    """HF MobileNetV2 as configured (ReLU6, TensorFlow padding): nothing to fuse, every BN
    converted; with ReLU and ordinary padding (apply_tf_padding does Python arithmetic on shapes,
    which torch.fx cannot trace) each expansion and depthwise BN is fused with its ReLU. In float64,
    stem and first blocks (the whole model's depthwise float64 convolutions take a minute)."""
    torch.manual_seed(0)
    cfg = transformers.MobileNetV2Config(depth_multiplier=0.25, image_size=16, num_labels=4,
                                         classifier_dropout_prob=0.0, hidden_act=act,
                                         tf_padding=act == "relu6")
    ref = _randomize(transformers.MobileNetV2ForImageClassification(cfg)).double().train()
    model, report = fuse(copy.deepcopy(ref), return_report=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert type(model) is type(ref) and model.training and n_bn == 52
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert list(model.state_dict()) == list(ref.state_dict())
    assert isinstance(report, FuseReport)
    if act == "relu6":
        assert report.fused == [] and len(report.unfused) == n_bn
    else:  # stem: 2; blocks: expansion (not in the first) and depthwise; the last 1x1 conv
        assert report.count("relu") == 2 + 2 * 16 + 1 and report.count("add+relu") == 0
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    _compare_parts(ref, model, ["mobilenet_v2.conv_stem"] + [f"mobilenet_v2.layer.{i}"
                                                             for i in range(3)], x, F64_MODEL)


@pytest.mark.parametrize("act", ["swish", "relu"])
def test_hf_efficientnet_fused_matches_torch(act):
    """HF EfficientNet (a small config) as designed (swish: nothing to fuse, every BN converted)
    and with ReLU (stem, expansion, depthwise and top BNs fused); the whole classifier in float64."""
    torch.manual_seed(0)
    cfg = transformers.EfficientNetConfig(image_size=32, width_coefficient=0.25,
                                          depth_coefficient=0.1, hidden_dim=320, hidden_act=act,
                                          dropout_rate=0.0, drop_connect_rate=0.0, num_labels=4)
    ref = _randomize(transformers.EfficientNetForImageClassification(cfg)).double().train()
    model, report = fuse(copy.deepcopy(ref), return_report=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert type(model) is type(ref) and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert list(model.state_dict()) == list(ref.state_dict())
    if act == "swish":
        assert report.fused == [] and len(report.unfused) == n_bn
    else:
        assert report.count("relu") == 14 and report.count("add+relu") == 0 and n_bn == 22
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _compare_parts(ref, model, [""], x, F64_MODEL)


class _DenseLayer(nn.Module):
    """torchvision's DenseNet layer: BN -> ReLU (in place) -> 1x1 conv -> BN -> ReLU -> 3x3 conv on
    the concatenation of every earlier feature map, passed as a list."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        prev = [features] if isinstance(features, torch.Tensor) else features
        out = self.conv1(self.relu1(self.norm1(torch.cat(prev, 1))))
        return self.conv2(self.relu2(self.norm2(out)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int) -> None:
        super().__init__({f"denselayer{i + 1}": _DenseLayer(cin + i * growth, growth)
                          for i in range(n)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class TinyDenseNet(nn.Module):
    """torchvision's DenseNet layout: ``features`` (stem, dense blocks, a transition BN -> ReLU ->
    conv -> pool, the final ``norm5``), then ``F.relu`` in the parent's forward, pooling, linear."""

    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, 3, padding=1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(8))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("denseblock1", _DenseBlock(2, 8, growth))
        c = 8 + 2 * growth
        self.features.add_module("transition1", nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False),
            nn.AvgPool2d(2)))
        self.features.add_module("denseblock2", _DenseBlock(2, c // 2, growth))
        self.features.add_module("norm5", nn.BatchNorm2d(c // 2 + 2 * growth))
        self.classifier = nn.Linear(c // 2 + 2 * growth, 5)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def test_densenet_layout_every_bn_fused_and_matches_torch():
    """DenseNet's BN -> ReLU before each convolution (on concatenations, across module boundaries
    and with the last ReLU in the parent's forward): all 11 batch norms fused, no add; the same
    outputs, gradients and running statistics as torch."""
    torch.manual_seed(0)
    ref = _randomize(TinyDenseNet()).train()
    with tuning.override(**CPU_SMOKE_KNOBS):  # channel tiles: fewer interpreter programs
        model, report = _compare(ref, torch.randn(3, 3, 8, 8))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert n_bn == 11 and report.count("relu") == n_bn and report.unfused == []
    assert report.untraced == [] and "features.norm5" in {s.name for s in report.fused}
