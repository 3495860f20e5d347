"""The web demo (app.py): its handlers on the shipped demo models, and the page in a real headless
Chromium (marked `browser`: it runs where Gradio, selenium, chromium and chromedriver are
installed, as .ci/run installs them; APP_SCREENSHOTS=DIR keeps its screenshots)."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO / "ar_text" / "model.safetensors").is_file(), reason="no shipped demo")


@needs_demo
def test_handlers_answer_and_refuse_in_one_line(tmp_path):
    from app import Studio, parse_args
    studio = Studio(parse_args(["--device", "cpu", "--output-dir", str(tmp_path), "--captioner", str(tmp_path / "nowhere"),
                                "--mesh-resolution", "48", "--frames", "4", "--render-resolution", "32"]))
    assert set(studio.pipes) == {"text", "image", "class"} and "nowhere" in studio.errors["caption"]
    glb, mp4, files, times = studio.text("a red torus", 0, 4.0, 10, 0.5, "")
    assert Path(glb).stat().st_size > 0 and Path(mp4).is_file() and len(files) == 2 and "sample" in times
    with pytest.raises(ValueError, match="empty prompt"):
        studio.text("   ", 0, 4.0, 10, 0.5, "")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        studio.image(str(tmp_path / "notes.txt"), 0, 4.0, 10, 0.5, "")
    with pytest.raises(ValueError, match="this model knows: "):
        studio.category("chair", 0, 250)
    with pytest.raises(ValueError, match="the caption model did not load: .*nowhere"):
        studio.caption(glb, "")
    with pytest.raises(ValueError, match="model folder .*: no such folder"):
        studio.text("a red torus", 0, 4.0, 10, 0.5, str(tmp_path / "missing"))


def browser_ready() -> bool:
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError:
        return False
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """app.py on a free local port, the demo models loaded; yields its URL and start-up seconds."""
    out = tmp_path_factory.mktemp("app")
    port = free_port()
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--output-dir", str(out),
                             "--mesh-resolution", "64", "--frames", "12"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}/"
    import urllib.request
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited: {proc.stdout.read()}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("app.py did not answer within 120 s")
    yield url, time.perf_counter() - t
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    o = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100",
                "--autoplay-policy=no-user-gesture-required"):
        o.add_argument(arg)
    o.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=o)
    yield driver
    driver.quit()


def wait_for(driver, check, seconds: float = 120, what: str = ""):
    end = time.time() + seconds
    while time.time() < end:
        value = check(driver)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"waited {seconds} s for {what}")


def drawn(element) -> float:
    """Share of an element's pixels, as the browser shows them, that are not the page's white or
    grey background: above a few percent when the viewer shows a model."""
    import io

    import numpy as np
    from PIL import Image
    px = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(int)
    return float((np.abs(px - px[2, 2]).max(-1) > 40).mean())


def shown(tab: str):
    """The viewer shows a model (its canvas has something drawn on it) and the turntable video
    has frames to play."""
    script = f"const v = document.querySelector('#{tab}-video video'); return v ? v.readyState : -1;"

    def check(d):
        canvas = d.find_elements("css selector", f"#{tab}-model canvas")
        return bool(canvas) and d.execute_script(script) >= 2 and drawn(canvas[0]) > 0.02
    return check


def message(text: str):
    return lambda d: text in d.find_element("tag name", "body").text


def screenshot(driver, tmp_path, name: str) -> None:
    driver.execute_script("document.querySelectorAll('.toast-close').forEach(b => b.click());")
    time.sleep(1)
    driver.save_screenshot(str(tmp_path / name))
    if os.environ.get("APP_SCREENSHOTS"):
        Path(os.environ["APP_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(os.environ["APP_SCREENSHOTS"]) / name)


def open_tab(driver, label: str) -> None:
    driver.find_element("xpath", f"//button[@role='tab'][contains(., '{label}')]").click()
    time.sleep(0.5)


@pytest.mark.browser
@pytest.mark.skipif(not browser_ready(), reason="needs gradio, selenium, chromium and chromedriver")
@needs_demo
def test_the_page_generates_queues_and_reports_bad_input(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    url, startup = served
    assert startup < 60, f"app.py took {startup:.0f} s to serve"
    d = browser
    d.get(url)
    prompt = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60, "the page")[0]
    # An empty prompt: a message, and the page still works.
    d.find_element(By.ID, "text-generate").click()
    wait_for(d, message("empty prompt"), 30, "the empty-prompt message")
    t = time.perf_counter()
    prompt.send_keys("a red torus")
    d.find_element(By.ID, "text-generate").click()
    wait_for(d, shown("text"), 120, "the text tab's model and video")
    first = time.perf_counter() - t
    assert first < 60, f"the first answer took {first:.0f} s"
    assert "sample" in d.find_element(By.ID, "text-times").text
    screenshot(d, tmp_path, "app_text.png")
    # Two requests at once, from two browser tabs: both are answered (the second waits its turn).
    first_tab = d.current_window_handle
    done = d.find_element(By.ID, "text-times").text
    d.switch_to.new_window("tab")
    d.get(url)
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60, "the second page")[0] \
        .send_keys("a blue cone")
    d.find_element(By.ID, "text-generate").click()
    second_tab = d.current_window_handle
    d.switch_to.window(first_tab)
    box = d.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.clear()
    box.send_keys("a green box")
    d.find_element(By.ID, "text-generate").click()
    wait_for(d, lambda d: d.find_element(By.ID, "text-times").text not in ("", done) and shown("text")(d), 180,
             "the first tab's second answer")
    d.switch_to.window(second_tab)
    wait_for(d, shown("text"), 180, "the second tab's answer")
    d.close()
    d.switch_to.window(first_tab)
    # The image tab: a file that is not an image gives a message, an image gives a model.
    open_tab(d, "Image to 3D")
    (tmp_path / "notes.txt").write_text("not an image")
    upload = d.find_element(By.CSS_SELECTOR, "#image-input input[type=file]")
    upload.send_keys(str(tmp_path / "notes.txt"))
    time.sleep(2)
    d.find_element(By.ID, "image-generate").click()
    wait_for(d, message("the upload notes.txt: not a readable image file"), 60, "the not-an-image message")
    d.find_element(By.CSS_SELECTOR, "#image-input button[aria-label='Clear']").click()
    upload = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"), 30,
                      "the cleared upload box")[0]
    upload.send_keys(str(ROOT / "test_files" / "images" / "a_yellow_cone.png"))
    time.sleep(2)
    d.find_element(By.ID, "image-generate").click()
    wait_for(d, shown("image"), 120, "the image tab's model and video")
    screenshot(d, tmp_path, "app_image.png")
    # The class tab (Argus-3D) and the caption tab.
    open_tab(d, "Class to 3D")
    d.find_element(By.ID, "class-generate").click()
    wait_for(d, shown("class"), 180, "the class tab's model and video")
    screenshot(d, tmp_path, "app_class.png")
    import trimesh
    box = trimesh.creation.box((0.6, 0.6, 0.6))
    box.visual.vertex_colors = [200, 30, 30, 255]
    box.export(tmp_path / "red_box.glb")
    open_tab(d, "3D to caption")
    d.find_element(By.CSS_SELECTOR, "#caption-input input[type=file]").send_keys(str(tmp_path / "red_box.glb"))
    time.sleep(2)
    d.find_element(By.ID, "caption-go").click()
    answer = wait_for(d, lambda d: d.find_element(By.CSS_SELECTOR, "#caption-output textarea").get_attribute("value"),
                      120, "the caption")
    assert answer.startswith("a ") and answer.rstrip().endswith(" s)"), answer

