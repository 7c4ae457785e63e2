"""ViT-Adapter and UperNet (temporary home until vitsplit/model/ exists)."""
