"""The web demo (`univigu serve`): T2V, V2T and joint generation in the browser.

`media` holds what the page shows (browser-playable videos, frame strips, the text canvas as it
unmasks, the oracle's reading) and the checks on what it receives; it needs no Gradio. `app`
builds the Gradio page on a `UniViGUPipeline` and needs the `web` extra (`pip install -e ".[web]"`).
"""
