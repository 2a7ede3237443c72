"""Faults ``fkd-dali doctor --plant X`` introduces, to show that the checks catch them."""

FAULTS = {
    "shifted-box": "replay reads a store whose boxes are shifted 2 px to the right of the true crops",
    "decoder-option": "decode without fancy chroma upsampling and with libjpeg-turbo's fast IDCT",
}
