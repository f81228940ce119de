"""Danbooru scraper: posts and images into the dataset directory, politely, resumably, never corrupt.

- :mod:`.http`: the one polite client (User-Agent, shared rate limit, retries, Retry-After, credentials)
- :mod:`.danbooru`: API and HTML parsing into posts, and the paging of a query
- :mod:`.run`: the loop (``scrape``): decide, download, verify, rename, append the line

Posts come from the JSON API (``/posts.json``, paged with the ``page=b<id>`` cursor) or, with
``source="html"``, from the HTML post list and post pages; both give identical ``posts.jsonl`` lines.
"""

from .danbooru import PAGE_SIZE, PostInfo, parse_api_post, parse_post_list, parse_post_page, post_record
from .http import (DEFAULT_BASE_URL, USER_AGENT, DanbooruClient, FetchError, PageFormatError, RateLimiter,
                   check_url, normalize_base_url, parse_retry_after)
from .result import ScrapeResult
from .run import scrape

__all__ = ["DanbooruClient", "RateLimiter", "ScrapeResult", "PostInfo", "FetchError", "PageFormatError", "scrape",
           "parse_api_post", "parse_post_list", "parse_post_page", "post_record", "normalize_base_url",
           "parse_retry_after", "check_url", "USER_AGENT", "DEFAULT_BASE_URL", "PAGE_SIZE"]
