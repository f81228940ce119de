"""Using a trained model: tagging and embedding images, Grad-CAM explanations, screening folders and
exporting to other runtimes."""
