"""The networks and their losses: MobileNetV2 backbone, FPN necks, K-Net, the Mask R-CNN
reference, the Hungarian matcher and the set criterion; `build.build_model` turns a
ModelConfig into one of them."""
