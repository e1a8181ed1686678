"""Visual-token reducers. One module per method; configs/reducer/<name>.yaml builds each."""
