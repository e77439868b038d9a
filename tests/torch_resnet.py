"""A torchvision-layout ResNet built from torch.nn (torchvision is not installed): the oracle of
tests/test_convert.py (import) and tests/test_export.py (export). torch is a test oracle only."""

from aacp_jax.models.resnet import DEPTHS


def torch_resnet(torch, depth, num_classes, width=64, in_channels=3):
  """torchvision.models.resnet{depth}'s modules and state-dict keys at any width and input channel
  count; `num_classes=None` drops `fc` and returns the pooled features."""
  nn = torch.nn
  kind, blocks = DEPTHS[depth]
  expansion = 1 if kind == 'basic' else 4

  class Block(nn.Module):
    def __init__(self, inplanes, planes, stride):
      super().__init__()
      if kind == 'basic':
        specs = [(inplanes, planes, 3, stride), (planes, planes, 3, 1)]
      else:  # v1.5: stride on the 3x3
        specs = [(inplanes, planes, 1, 1), (planes, planes, 3, stride), (planes, planes * 4, 1, 1)]
      for i, (ci, co, k, s) in enumerate(specs, 1):
        setattr(self, f'conv{i}', nn.Conv2d(ci, co, k, s, k // 2, bias=False))
        setattr(self, f'bn{i}', nn.BatchNorm2d(co))
      self.n = len(specs)
      self.relu = nn.ReLU()
      out = planes * expansion
      self.downsample = None
      if stride != 1 or inplanes != out:
        self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
        )

    def forward(self, x):
      y = x
      for i in range(1, self.n + 1):
        y = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(y))
        if i < self.n:
          y = self.relu(y)
      return self.relu(y + (x if self.downsample is None else self.downsample(x)))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.relu = nn.ReLU()
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      inplanes = width
      for s, n in enumerate(blocks):
        layers = []
        for i in range(n):
          planes = width * 2**s
          layers.append(Block(inplanes, planes, 2 if (s > 0 and i == 0) else 1))
          inplanes = planes * expansion
        setattr(self, f'layer{s + 1}', nn.Sequential(*layers))
      self.avgpool = nn.AdaptiveAvgPool2d(1)
      self.fc = None if num_classes is None else nn.Linear(inplanes, num_classes)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      for s in range(1, 5):
        x = getattr(self, f'layer{s}')(x)
      x = torch.flatten(self.avgpool(x), 1)
      return x if self.fc is None else self.fc(x)

  return Net()


def randomise_bn(torch, net):
  """Random BN affine params and running stats, so eval mode is a non-trivial test of the import.

  (Running stats taken from a real 2 x 32 x 32 batch are degenerate: layer4 is 1 x 1, two samples.)
  """
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
  return net.eval()
