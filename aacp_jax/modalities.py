"""The imaging modalities and their encoder inputs (ARCHITECTURE: Records)."""

MODALITIES = ('ct', 'mri', 'xray')
# CT: 64 consecutive 1 mm axial slices as channels (2.5D); MRI: T1, T2, FLAIR; X-ray: one channel.
IN_CHANNELS = {'ct': 64, 'mri': 3, 'xray': 1}
