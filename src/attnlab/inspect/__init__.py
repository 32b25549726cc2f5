"""Looking inside attention: attention maps, explanations, pictures, the interactive page, head roles."""
