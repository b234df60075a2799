"""DeepSC-COVID inference: joint 3D lesion segmentation and scan classification."""
