"""zju-vipa/DataFree's CIFAR classifiers in PyTorch, transcribed from their
datafree/models/classifiers/resnet.py, wresnet.py and vgg.py (module and attribute names,
layer order and forward passes as theirs; their weight initialisation is left out, the tests
draw their own weights), and their registry.py's names. Used by tests/test_zoo_teachers.py to
check that this project's models (models/cifar_zoo.py, classifiers.ResNet) give the logits of
theirs from the same state_dict. Needs torch.
"""
import torch
from torch import nn
from torch.nn import functional as F


# --- resnet.py (the DAFL authors' CIFAR ResNet, with adaptive average pooling) ---------------

class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != self.expansion * planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride,
                    bias=False),
          nn.BatchNorm2d(self.expansion * planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += self.shortcut(x)
    return F.relu(out)


class ResNet(nn.Module):

  def __init__(self, block, num_blocks, num_classes=10):
    super().__init__()
    self.in_planes = 64
    self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
    self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
    self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
    self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
    self.linear = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, num_blocks, stride):
    strides = [stride] + [1] * (num_blocks - 1)
    layers = []
    for stride in strides:
      layers.append(block(self.in_planes, planes, stride))
      self.in_planes = planes * block.expansion
    return nn.Sequential(*layers)

  def forward(self, x, return_features=False):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    out = F.adaptive_avg_pool2d(out, (1, 1))
    feature = out.view(out.size(0), -1)
    out = self.linear(feature)
    return (out, feature) if return_features else out


# --- wresnet.py (ZSKT's Wide ResNet) ---------------------------------------------------------

class WideBasicBlock(nn.Module):
  """Their wresnet.BasicBlock."""

  def __init__(self, in_planes, out_planes, stride, dropout_rate=0.0):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1,
                           bias=False)
    self.dropout = nn.Dropout(dropout_rate)
    self.equalInOut = (in_planes == out_planes)  # pylint: disable=invalid-name
    self.convShortcut = (not self.equalInOut) and nn.Conv2d(  # pylint: disable=invalid-name
        in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False) or None

  def forward(self, x):
    if not self.equalInOut:
      x = self.relu1(self.bn1(x))
    else:
      out = self.relu1(self.bn1(x))
    out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
    out = self.dropout(out)
    out = self.conv2(out)
    return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):

  def __init__(self, nb_layers, in_planes, out_planes, block, stride, dropout_rate=0.0):
    super().__init__()
    self.layer = nn.Sequential(*[
        block(i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1,
              dropout_rate) for i in range(nb_layers)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):

  def __init__(self, depth, num_classes, widen_factor=1, dropout_rate=0.0):
    super().__init__()
    n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    assert (depth - 4) % 6 == 0, "depth should be 6n+4"
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, n_channels[0], kernel_size=3, stride=1, padding=1, bias=False)
    self.block1 = NetworkBlock(n, n_channels[0], n_channels[1], WideBasicBlock, 1, dropout_rate)
    self.block2 = NetworkBlock(n, n_channels[1], n_channels[2], WideBasicBlock, 2, dropout_rate)
    self.block3 = NetworkBlock(n, n_channels[2], n_channels[3], WideBasicBlock, 2, dropout_rate)
    self.bn1 = nn.BatchNorm2d(n_channels[3])
    self.relu = nn.ReLU(inplace=True)
    self.fc = nn.Linear(n_channels[3], num_classes)
    self.nChannels = n_channels[3]  # pylint: disable=invalid-name

  def forward(self, x, return_features=False):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = self.relu(self.bn1(out))
    out = F.adaptive_avg_pool2d(out, (1, 1))
    features = out.view(-1, self.nChannels)
    out = self.fc(features)
    return (out, features) if return_features else out


# --- vgg.py (RepDistiller's VGG) -------------------------------------------------------------

class VGG(nn.Module):

  def __init__(self, cfg, batch_norm=False, num_classes=1000):
    super().__init__()
    self.block0 = self._make_layers(cfg[0], batch_norm, 3)
    self.block1 = self._make_layers(cfg[1], batch_norm, cfg[0][-1])
    self.block2 = self._make_layers(cfg[2], batch_norm, cfg[1][-1])
    self.block3 = self._make_layers(cfg[3], batch_norm, cfg[2][-1])
    self.block4 = self._make_layers(cfg[4], batch_norm, cfg[3][-1])
    self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x, return_features=False):
    h = x.shape[2]
    x = F.relu(self.block0(x))
    x = self.pool0(x)
    x = F.relu(self.block1(x))
    x = self.pool1(x)
    x = F.relu(self.block2(x))
    x = self.pool2(x)
    x = F.relu(self.block3(x))
    if h == 64:
      x = self.pool3(x)
    x = F.relu(self.block4(x))
    x = self.pool4(x)
    features = x.view(x.size(0), -1)
    x = self.classifier(features)
    return (x, features) if return_features else x

  @staticmethod
  def _make_layers(cfg, batch_norm=False, in_channels=3):
    layers = []
    for v in cfg:
      if v == "M":
        layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
      else:
        conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
        if batch_norm:
          layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        else:
          layers += [conv2d, nn.ReLU(inplace=True)]
        in_channels = v
    layers = layers[:-1]
    return nn.Sequential(*layers)


VGG_CFG = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


# --- registry.py's MODEL_DICT (the CIFAR classifiers above) ----------------------------------

MODEL_DICT = {
    "wrn16_1": lambda num_classes: WideResNet(16, num_classes, 1),
    "wrn16_2": lambda num_classes: WideResNet(16, num_classes, 2),
    "wrn40_1": lambda num_classes: WideResNet(40, num_classes, 1),
    "wrn40_2": lambda num_classes: WideResNet(40, num_classes, 2),
    "vgg8": lambda num_classes: VGG(VGG_CFG["S"], batch_norm=True, num_classes=num_classes),
    "vgg11": lambda num_classes: VGG(VGG_CFG["A"], batch_norm=True, num_classes=num_classes),
    "vgg13": lambda num_classes: VGG(VGG_CFG["B"], batch_norm=True, num_classes=num_classes),
    "resnet18": lambda num_classes: ResNet(BasicBlock, [2, 2, 2, 2], num_classes),
    "resnet34": lambda num_classes: ResNet(BasicBlock, [3, 4, 6, 3], num_classes),
}
