// Loads every UI-format example workflow into the real ComfyUI web frontend (Debian Chromium driven
// by playwright-core) and records what the frontend made of it. One browser, one page, all workflows.
//
// Usage: node check_workflows.mjs <config.json>
//   config: {"url": "http://127.0.0.1:PORT", "pack": "reducio-fastattn", "out": "<result.json>",
//            "screenshot_dir": "<dir>" | null, "user_data_dir": "<fresh dir>",
//            "workflows": [{"name": "x.json", "path": "/abs/x.json"}]}
//
// The script only observes and writes raw facts to `out`; tests/server/test_browser_workflows.py
// compares them with the committed files, so a failure message can name file, node and widget.
import { readFileSync, writeFileSync, renameSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.REDUCIO_CHROMIUM || '/usr/bin/chromium';
const PAGE_READY_TIMEOUT_MS = 180_000;   // the frontend bundle is large; 2 busy CPU cores are slow
const LOAD_SETTLE_MS = 400;              // dialogs and toasts are shown asynchronously after loading
const FIRST_RUN_DIALOG_WAIT_MS = 20_000; // the first-run Templates browser opens a few seconds late

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

// Runs inside the page: the visible PrimeVue dialogs and toasts, as text.
function visibleOverlays() {
  const texts = (selector) => [...document.querySelectorAll(selector)]
    .filter((el) => el.offsetParent !== null || el.getClientRects().length > 0)
    .map((el) => el.innerText.trim().replace(/\s+/g, ' ').slice(0, 8000))
    .filter(Boolean);
  return { dialogs: texts('.p-dialog'), toasts: texts('.p-toast-message') };
}

async function closeOverlays(page) {
  // The templates browser (and any warning dialog) closes on Escape.
  for (let i = 0; i < 5; i++) {
    const { dialogs } = await page.evaluate(visibleOverlays);
    if (!dialogs.length) return;
    if (i < 1) {
      await page.keyboard.press('Escape');
    } else {
      // Escape does nothing while focus sits inside some dialogs (the Templates browser after a
      // click in its sidebar): use the dialog's own close button, as a user would.
      await page.locator('.p-dialog button:has(i.pi-times), .p-dialog button[aria-label="Close"], '
                   + '.p-dialog .p-dialog-close-button')
        .first().click({ timeout: 5000 }).catch(() => {});
    }
    await page.waitForTimeout(400);
  }
  const { dialogs } = await page.evaluate(visibleOverlays);
  if (dialogs.length) throw new Error('a dialog does not close on Escape: ' + dialogs.join(' | '));
}

// A fresh user sees the Templates browser on first load (it opens a few seconds after the app is
// ready). Open the pack's section in it, as a user would, and record what it shows.
async function inspectTemplateBrowser(page, config) {
  const seen = { opened_by_itself: false, pack_section: false, text: null, screenshot: null };
  const deadline = Date.now() + FIRST_RUN_DIALOG_WAIT_MS;
  while (Date.now() < deadline) {
    const { dialogs } = await page.evaluate(visibleOverlays);
    if (dialogs.some((t) => t.includes(config.pack))) { seen.opened_by_itself = true; break; }
    await page.waitForTimeout(500);
  }
  if (!seen.opened_by_itself) {
    // Older frontends (or a user who dismissed it once) do not open it: use the Templates command.
    await page.evaluate(() => window.app.extensionManager?.command?.execute('Comfy.BrowseTemplates'));
  }
  const packEntry = page.locator('.p-dialog').getByText(config.pack, { exact: true }).first();
  try {
    await packEntry.click({ timeout: 30_000 });
    seen.pack_section = true;
    await page.waitForTimeout(1500);   // cards render after their thumbnails are requested
  } catch (err) {
    seen.click_error = String(err && err.message || err).slice(0, 500);
  }
  seen.text = (await page.evaluate(visibleOverlays)).dialogs.join(' | ');
  if (config.screenshot_dir) {
    seen.screenshot = join(config.screenshot_dir, 'template_browser.png');
    await page.screenshot({ path: seen.screenshot });
  }
  return seen;
}

// Runs inside the page: loads one workflow and reads back the live graph.
async function loadAndInspect({ text, name }) {
  const app = window.app;
  const workflow = JSON.parse(text);
  const types = [...new Set(workflow.nodes.map((n) => n.type))];
  const unregistered = types.filter((t) => !(t in window.LiteGraph.registered_node_types));
  let loadError = null;
  try {
    await app.loadGraphData(workflow, true, true, name);
  } catch (err) {
    loadError = String(err && err.stack || err);
  }
  const graph = app.graph;
  const nodes = (graph._nodes || graph.nodes || []).map((node) => ({
    id: node.id,
    type: node.type,
    title: node.title,
    has_errors: !!node.has_errors,
    // Bounding box on the canvas as drawn, title bar included (for the overlap check).
    bounds: [node.pos[0], node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT,
             node.size[0], node.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT],
    widgets: (node.widgets || []).map((w) => ({
      name: w.name, type: w.type, value: w.value === undefined ? null : w.value,
      serialize: w.options?.serialize !== false && w.serialize !== false,
      options: Array.isArray(w.options?.values) ? w.options.values.slice(0, 200) : null,
    })),
    inputs: (node.inputs || []).map((i) => ({ name: i.name, type: i.type, link: i.link ?? null,
                                              widget: i.widget?.name ?? null })),
  }));
  const serialized = graph.serialize();
  let prompt = null;
  let promptError = null;
  try {
    prompt = (await app.graphToPrompt()).output;
  } catch (err) {
    promptError = String(err && err.stack || err);
  }
  return { unregistered, load_error: loadError, nodes, serialized, prompt, prompt_error: promptError };
}

async function main() {
  mkdirSync(config.user_data_dir, { recursive: true });
  const context = await chromium.launchPersistentContext(config.user_data_dir, {
    executablePath: CHROMIUM,
    headless: true,
    // Large enough that a fitted graph keeps its text (LiteGraph drops it below about 50% zoom).
    viewport: { width: 2200, height: 1300 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const result = { url: config.url, browser: null, frontend_version: null, page_ready_s: null,
                   registered_node_type_count: 0, templates: null, workflows: {}, page_errors: [] };
  let consoleErrors = [];
  let pageErrors = [];   // uncaught exceptions, attributed to the phase (startup, workflow) they happen in
  try {
    result.browser = context.browser()?.version() ?? null;
    const page = context.pages()[0] || await context.newPage();
    page.on('pageerror', (err) => pageErrors.push(String(err && (err.stack || err.message) || err).slice(0, 1200)));
    page.on('console', (msg) => { if (msg.type() === 'error') consoleErrors.push(msg.text().slice(0, 500)); });

    const started = Date.now();
    await page.goto(config.url + '/', { waitUntil: 'domcontentloaded', timeout: PAGE_READY_TIMEOUT_MS });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types
      && Object.keys(window.LiteGraph.registered_node_types).length > 50,
      null, { timeout: PAGE_READY_TIMEOUT_MS, polling: 500 });
    result.page_ready_s = (Date.now() - started) / 1000;
    await page.waitForTimeout(2000);   // late start-up work (extensions, first-run dialog) runs now
    result.page_errors = pageErrors;
    pageErrors = [];
    result.template_browser = await inspectTemplateBrowser(page, config);
    await closeOverlays(page);
    result.template_browser.page_errors = pageErrors;
    result.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
    result.title_height = await page.evaluate(() => window.LiteGraph.NODE_TITLE_HEIGHT);
    result.registered_node_type_count = await page.evaluate(
      () => Object.keys(window.LiteGraph.registered_node_types).length);
    result.startup_console_errors = consoleErrors;
    if (config.screenshot_dir) {
      // Screenshots of whole graphs are taken zoomed out: keep node text (level-of-detail off).
      await page.evaluate(() => window.app.extensionManager?.setting?.set('LiteGraph.Canvas.MinFontSizeForLOD', 0))
        .catch(() => {});
    }

    // The template browser's data source, fetched by the page itself.
    result.templates = await page.evaluate(async ({ pack, names }) => {
      const listing = await (await fetch('/workflow_templates')).json();
      const served = {};
      for (const name of names) {
        const resp = await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}`);
        served[name] = { status: resp.status, text: resp.ok ? await resp.text() : null };
      }
      return { listing: listing[pack] ?? null, served };
    }, { pack: config.pack, names: config.workflows.filter((w) => !w.control).map((w) => w.name) });

    for (const wf of config.workflows) {
      await closeOverlays(page);
      consoleErrors = [];
      pageErrors = [];
      const text = readFileSync(wf.path, 'utf8');
      const record = await page.evaluate(loadAndInspect, { text, name: wf.name });
      await page.waitForTimeout(LOAD_SETTLE_MS);
      const overlays = await page.evaluate(visibleOverlays);
      record.dialogs = overlays.dialogs;
      record.toasts = overlays.toasts;
      record.console_errors = consoleErrors;
      record.page_errors = pageErrors;
      if (config.screenshot_dir && !wf.control) {
        await closeOverlays(page);
        // Frame the whole graph: a workflow without a saved view keeps the previous one.
        await page.evaluate(async () => {
          try { await window.app.extensionManager?.command?.execute('Comfy.Canvas.FitView'); } catch (e) { /* older */ }
          window.app.canvas?.setDirty?.(true, true);
        });
        await page.waitForTimeout(300);
        const shot = join(config.screenshot_dir, wf.name.replace(/\.json$/, '.png'));
        await page.screenshot({ path: shot });
        record.screenshot = shot;
      }
      await closeOverlays(page);
      result.workflows[wf.name] = record;
    }

    // Open every entry the pack lists as the Templates browser does (fetch, then loadGraphData
    // with openSource 'template'), and count the nodes the user would get.
    result.template_opens = {};
    for (const name of result.templates.listing || []) {
      await closeOverlays(page);
      pageErrors = [];
      const opened = await page.evaluate(async ({ pack, name }) => {
        const data = await (await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.json`)).json();
        let error = null;
        try {
          await window.app.loadGraphData(data, true, true, name, { openSource: 'template' });
        } catch (err) {
          error = String(err && err.message || err);
        }
        const graph = window.app.graph;
        return { error, node_count: (graph._nodes || graph.nodes || []).length };
      }, { pack: config.pack, name });
      await page.waitForTimeout(LOAD_SETTLE_MS);
      opened.dialogs = (await page.evaluate(visibleOverlays)).dialogs;
      opened.page_errors = pageErrors;
      result.template_opens[name] = opened;
    }
  } catch (err) {
    result.fatal = String(err && err.stack || err);
  } finally {
    await context.close();
  }
  // Written to a temp name then renamed: a reader never sees half a file.
  writeFileSync(config.out + '.tmp', JSON.stringify(result, null, 1));
  renameSync(config.out + '.tmp', config.out);
  if (result.fatal) {
    console.error(result.fatal);
    process.exit(2);
  }
}

main().catch((err) => { console.error(err); process.exit(3); });
