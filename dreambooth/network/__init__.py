"""Training methods that adapt a frozen model through small added networks (LoRA, LoHa, LoKr), and their files.

The adapter math is LyCORIS's (``lycoris-lora``); this package chooses the layers, names them as kohya's files
and the WebUI's Lora loader do, and reads and writes the files.
"""
