// LlamaBoard in a real headless Chromium: hydration, language switch, a LoRA run started from the
// form with a live chart, the run history, chat with the result (streamed), export.
// The server is a lone copy of the binary in an empty folder: the browser bundle it serves is the
// one built into it, under its Content Security Policy (a violation is a console error).
// Env: LLAMAFACTORY_BIN (server binary), CHROMIUM (default /usr/bin/chromium),
//      SCREENSHOTS (folder for the screenshots).
import { chromium } from 'playwright-core';
import { spawn } from 'node:child_process';
import { chmodSync, copyFileSync, mkdtempSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';

const repo = resolve(new URL('../..', import.meta.url).pathname);
const bin = process.env.LLAMAFACTORY_BIN || join(repo, 'target/debug/llamafactory');
const shots = process.env.SCREENSHOTS || join(repo, 'target/e2e-screenshots');
mkdirSync(shots, { recursive: true });
const work = mkdtempSync(join(tmpdir(), 'llamaboard-e2e-'));

function fail(msg) {
  console.error(`FAIL: ${msg}`);
  process.exitCode = 1;
  throw new Error(msg);
}

async function startServer() {
  const lone = mkdtempSync(join(tmpdir(), 'llamaboard-bin-'));
  const copy = join(lone, 'llamafactory');
  copyFileSync(bin, copy);
  chmodSync(copy, 0o755);
  const env = { ...process.env, GRADIO_SERVER_NAME: '127.0.0.1' };
  delete env.LLAMAFACTORY_SITE_ROOT;
  const srv = spawn(copy, ['webui', '--port', '0', '--workdir', work], {
    cwd: lone,
    env,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: srv.stdout });
  const url = await new Promise((ok, bad) => {
    const timer = setTimeout(() => bad(new Error('server did not start in 120 s')), 120000);
    lines.on('line', (l) => {
      const m = l.match(/Visit (http:\/\/\S+)/);
      if (m) { clearTimeout(timer); ok(m[1]); }
    });
    srv.on('exit', (c) => bad(new Error(`server exited with ${c}`)));
  });
  return { srv, url };
}

const { srv, url } = await startServer();
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const errors = [];
let tokenFrames = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  page.on('pageerror', (e) => errors.push(String(e)));
  const encodings = {};
  page.on('response', async (r) => {
    if (r.url().includes('/pkg/')) encodings[r.url().split('/pkg/')[1]] = (await r.allHeaders())['content-encoding'];
  });
  page.on('websocket', (ws) => {
    if (ws.url().endsWith('/api/chat')) {
      ws.on('framereceived', (f) => { if (String(f.payload).includes('"type":"token"')) tokenFrames++; });
    }
  });
  await page.goto(url);
  await page.waitForSelector('#hydrated[data-state="hydrated"]', { timeout: 30000 });
  if (!['br', 'gzip'].includes(encodings['frontend_bg.wasm'])) fail(`the wasm was not served compressed: ${JSON.stringify(encodings)}`);
  console.log('hydrated');

  // Language: every tab label follows.
  await page.selectOption('#f-lang', 'zh');
  await page.waitForFunction(() => document.querySelector('[data-tab="tab_train"]').textContent === '训练');
  if ((await page.textContent('[data-tab="tab_chat"]')) !== '对话') fail('chat tab not translated');
  if (!(await page.textContent('body')).includes('学习率')) fail('learning rate label not translated');
  await page.selectOption('#f-lang', 'en');
  await page.waitForFunction(() => document.querySelector('[data-tab="tab_train"]').textContent === 'Train');
  console.log('language switch ok');

  // The demo model is picked and its template filled in.
  await page.waitForFunction(() => document.querySelector('#f-top-model_name_or_path').value.includes('demo'));
  if ((await page.inputValue('#f-template')) !== 'qwen') fail('template not auto-filled from the model');
  if (!(await page.textContent('[data-testid="template-reason"]')).includes('demo model')) fail('the template choice does not say why');

  // A validation message next to its field, not an alert.
  await page.click('[data-testid="start"]');
  await page.waitForSelector('.field-error[data-field="dataset"]');
  console.log('validation ok');

  // PPO asks for a reward model under its own control (LlamaBoard's message).
  await page.selectOption('#f-train-stage', 'ppo');
  await page.check('input[name="dataset"][value="demo_sft"]');
  await page.click('[data-testid="start"]');
  await page.waitForSelector('.field-error[data-field="reward_model"]');
  if (!(await page.textContent('.field-error[data-field="reward_model"]')).includes('reward model')) fail('PPO without a reward model gave no clear message');
  await page.selectOption('#f-train-stage', 'sft');
  console.log('ppo validation ok');

  // A LoRA run from the form.
  await page.check('input[name="dataset"][value="demo_sft"]');
  // The dataset preview pages through the raw records.
  await page.click('[data-testid="preview-dataset"]');
  await page.waitForSelector('[data-testid="dataset-preview"]');
  const first = await page.textContent('[data-testid="dataset-preview"] pre');
  await page.click('[data-testid="dataset-preview"] button:has-text("Next")');
  await page.waitForFunction((f) => document.querySelector('[data-testid="dataset-preview"] pre').textContent !== f, first);
  if (!(await page.textContent('[data-testid="dataset-preview"] h3')).includes('3–4')) fail('preview did not page');
  await page.click('[data-testid="dataset-preview"] button:has-text("Close")');
  const fill = async (key, v) => page.fill(`#f-train-${key}`, v);
  await fill('learning_rate', '1e-3');
  await fill('num_train_epochs', '2');
  await fill('max_samples', '48');
  await fill('cutoff_len', '64');
  await fill('per_device_train_batch_size', '2');
  await fill('gradient_accumulation_steps', '1');
  await page.click('summary:has-text("Extra configurations")');
  await fill('logging_steps', '1');
  await fill('save_steps', '20');
  await fill('output_dir', 'e2e_run');
  await page.click('button:has-text("Preview command")');
  await page.waitForSelector('[data-testid="command"]');
  const yaml = await page.textContent('[data-testid="command"] pre.yaml');
  if (!/^learning_rate: 0\.001$/m.test(yaml)) fail(`preview lacks the learning rate typed in the form: ${yaml}`);
  if (!/^lr_scheduler_type: cosine$/m.test(yaml)) fail(`preview lacks the form's scheduler: ${yaml}`);
  await page.click('[data-testid="start"]');
  await page.waitForFunction(() => /running|queued/.test(document.querySelector('[data-testid="run-status"]').className));
  if (await page.isEnabled('[data-testid="start"]')) fail('Start stays enabled while a run is active');
  const count = () => page.evaluate(() => {
    const p = document.querySelector('[data-testid="loss-raw"]').getAttribute('points') || '';
    return p.trim() ? p.trim().split(' ').length : 0;
  });
  await page.waitForFunction(() => (document.querySelector('[data-testid="loss-raw"]').getAttribute('points') || '').trim().split(' ').length >= 3, null, { timeout: 120000 });
  const early = await count();
  await page.waitForFunction((n) => (document.querySelector('[data-testid="loss-raw"]').getAttribute('points') || '').trim().split(' ').length > n + 3, early, { timeout: 120000 });
  console.log(`chart grew past ${early} points`);
  // Reopening the page mid-run re-attaches: the history replays and live points keep coming.
  await page.reload();
  await page.waitForSelector('#hydrated[data-state="hydrated"]');
  await page.waitForFunction((n) => (document.querySelector('[data-testid="loss-raw"]').getAttribute('points') || '').trim().split(' ').length > n + 3, early, { timeout: 120000 });
  console.log('re-attached after reload');
  await page.hover('[data-testid="loss-chart"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="chart-hover"]').textContent.includes('Loss'));
  await page.screenshot({ path: join(shots, 'train-running.png'), fullPage: true });
  await page.waitForFunction(() => document.querySelector('[data-testid="run-status"]').className.includes('succeeded'), null, { timeout: 300000 });
  console.log(`run finished with ${await count()} points`);
  await page.waitForSelector('[data-testid="history"] tr[data-run] .badge.succeeded');
  await page.screenshot({ path: join(shots, 'train.png'), fullPage: true });

  // Reopening the page shows the finished run in the history.
  await page.reload();
  await page.waitForSelector('#hydrated[data-state="hydrated"]');
  await page.waitForSelector('[data-testid="history"] tr[data-run] .badge.succeeded');

  // Load the result in Chat: pick the adapter in the top bar.
  await page.waitForFunction(() => [...document.querySelectorAll('#f-checkpoint option')].some((o) => o.value.endsWith('e2e_run')));
  const ckpt = await page.evaluate(() => [...document.querySelectorAll('#f-checkpoint option')].find((o) => o.value.endsWith('e2e_run')).value);
  if ((await page.getAttribute('#f-checkpoint', 'multiple')) === null) fail('LoRA adapters should be multi-select');
  await page.selectOption('#f-checkpoint', ckpt);
  // Evaluate & Predict with the adapter: metrics and the prompt / predict / label rows.
  await page.click('[data-tab="tab_eval"]');
  await page.selectOption('#f-eval-dataset', 'demo_sft');
  await page.fill('#f-eval-max_samples', '4');
  await page.fill('#f-eval-cutoff_len', '128');
  await page.fill('#f-eval-max_new_tokens', '8');
  await page.click('[data-testid="eval-start"]');
  await page.waitForFunction(() => document.querySelectorAll('[data-testid="predictions"] tbody tr').length === 4, null, { timeout: 120000 });
  const metrics = await page.textContent('[data-testid="eval-metrics"]');
  if (!metrics.includes('predict_bleu-4') || !metrics.includes('predict_rouge-l')) fail(`eval metrics: ${metrics}`);
  console.log('predict ok');
  await page.screenshot({ path: join(shots, 'evaluate.png'), fullPage: true });
  await page.click('[data-tab="tab_chat"]');
  await page.click('[data-testid="chat-load"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="chat-status"]').textContent.includes('Model loaded'), null, { timeout: 60000 });
  await page.fill('#f-chat-max_new_tokens', '24');
  await page.fill('[data-testid="chat-input"]', 'Give three tips for staying healthy.');
  await page.click('[data-testid="chat-submit"]');
  await page.waitForFunction(() => {
    const b = document.querySelectorAll('[data-testid="chat-log"] .bubble.assistant');
    return b.length === 1 && b[0].textContent.length > 0 && !document.querySelector('[data-testid="chat-submit"]').disabled;
  }, null, { timeout: 60000 });
  if (tokenFrames < 2) fail(`the reply was not streamed (${tokenFrames} token frames)`);
  console.log(`chat reply streamed in ${tokenFrames} frames`);
  await page.screenshot({ path: join(shots, 'chat.png'), fullPage: true });

  // Export the merged model.
  await page.click('[data-tab="tab_export"]');
  await page.fill('#f-export-export_dir', 'e2e_export');
  await page.click('[data-testid="export-start"]');
  await page.waitForSelector('[data-testid="export-files"]', { timeout: 120000 });
  const files = await page.textContent('[data-testid="export-files"]');
  if (!files.includes('model.safetensors') || !files.includes('Modelfile')) fail(`export files: ${files}`);
  const written = readdirSync(join(work, 'saves', 'e2e_export'));
  if (!written.includes('config.json')) fail(`export dir holds ${written}`);
  console.log('export ok');
  await page.screenshot({ path: join(shots, 'export.png'), fullPage: true });

  // The optimization methods' controls reach the run's YAML, and a full GaLore run (with S²-Attn,
  // NEFTune and TensorBoard) started from the form finishes.
  await page.click('[data-tab="tab_train"]');
  const open = (label) => page.$eval(`details.group:has(> summary:has-text("${label}"))`, (d) => { d.open = true; });
  await page.selectOption('#f-top-finetuning_type', 'full');
  await page.check('input[name="dataset"][value="demo_sft"]');
  await open('GaLore configurations');
  await open('Extra configurations');
  await page.check('#f-train-use_galore');
  await fill('galore_rank', '4');
  await fill('galore_update_interval', '4');
  await page.check('#f-train-shift_attn');
  await fill('neftune_noise_alpha', '5');
  await page.selectOption('#f-train-report_to', 'tensorboard');
  await fill('num_train_epochs', '1');
  await fill('max_samples', '16');
  const preview = async () => {
    const old = await page.evaluate(() => document.querySelector('[data-testid="command"] pre.yaml')?.textContent);
    await page.click('button:has-text("Preview command")');
    // The command is fetched: wait for the new one (every call here changes the form).
    await page.waitForFunction((o) => document.querySelector('.field-error')
      || document.querySelector('[data-testid="command"] pre.yaml')?.textContent !== o, old);
    const err = await page.$('.field-error');
    if (err) fail(`the form refused the preview: ${await err.getAttribute('data-field')}: ${await err.textContent()}`);
    return page.textContent('[data-testid="command"] pre.yaml');
  };
  let methods = await preview();
  for (const line of ['finetuning_type: full', 'use_galore: true', 'galore_rank: 4', 'galore_update_interval: 4', 'shift_attn: true', 'neftune_noise_alpha: 5.0', 'report_to: tensorboard']) {
    if (!methods.split('\n').includes(line)) fail(`preview lacks "${line}": ${methods}`);
  }
  // A run of the form as it stands: a new history row, then success.
  const runFromForm = async (out) => {
    await fill('output_dir', out);
    const runs = await page.$$eval('[data-testid="history"] tr[data-run]', (r) => r.length);
    await page.click('[data-testid="start"]');
    await page.waitForFunction((n) => document.querySelectorAll('[data-testid="history"] tr[data-run]').length > n, runs, { timeout: 60000 });
    await page.waitForFunction(() => /succeeded|failed/.test(document.querySelector('[data-testid="run-status"]').className), null, { timeout: 300000 });
    const status = await page.getAttribute('[data-testid="run-status"]', 'class');
    if (!status.includes('succeeded')) fail(`${out}: ${await page.textContent('[data-testid="progress"]')}`);
    console.log(`${out} run from the form ok`);
  };
  await runFromForm('e2e_galore');
  // The other methods, one at a time (GaLore, APOLLO and BAdam exclude each other): each
  // control reaches the YAML and each run finishes.
  await page.uncheck('#f-train-use_galore');
  await open('BAdam configurations');
  await page.check('#f-train-use_badam');
  await page.selectOption('#f-train-badam_mode', 'ratio');
  await fill('badam_update_ratio', '0.1');
  methods = await preview();
  for (const line of ['use_badam: true', 'badam_mode: ratio', 'badam_update_ratio: 0.1']) {
    if (!methods.split('\n').includes(line)) fail(`preview lacks "${line}": ${methods}`);
  }
  await runFromForm('e2e_badam');
  await page.uncheck('#f-train-use_badam');
  await open('APOLLO configurations');
  await page.check('#f-train-use_apollo');
  methods = await preview();
  if (!methods.split('\n').includes('use_apollo: true')) fail(`preview lacks "use_apollo: true": ${methods}`);
  await runFromForm('e2e_apollo');
  await page.uncheck('#f-train-use_apollo');
  await page.selectOption('#f-top-finetuning_type', 'freeze');
  await page.check('#f-train-use_llama_pro');
  methods = await preview();
  if (!methods.split('\n').includes('use_llama_pro: true')) fail(`preview lacks use_llama_pro: ${methods}`);
  await runFromForm('e2e_llama_pro');
  await page.uncheck('#f-train-use_llama_pro');
  await page.selectOption('#f-top-finetuning_type', 'lora');
  await open('LoRA configurations');
  await page.check('#f-train-use_pissa');
  methods = await preview();
  if (!methods.split('\n').includes('pissa_init: true')) fail(`preview lacks pissa_init: ${methods}`);
  await runFromForm('e2e_pissa');
  await page.uncheck('#f-train-use_pissa');
  console.log('method controls ok');

  // GPTQ from the Export tab (no adapter selected): progress counts layers, the folder is written.
  await page.click('[data-tab="tab_export"]');
  await page.selectOption('#f-export-export_quantization_bit', '4');
  await page.fill('#f-export-export_quantization_dataset', 'demo_pt');
  await page.fill('#f-export-export_quantization_nsamples', '8');
  await page.fill('#f-export-export_quantization_maxlen', '8');
  await page.fill('#f-export-export_dir', 'e2e_gptq');
  await page.click('[data-testid="export-start"]');
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid="export-files"] td')].some((t) => t.textContent.includes('e2e_gptq')), null, { timeout: 120000 });
  const layers = await page.textContent('[data-panel="export"] [data-testid="step-count"]');
  if (!/^(\d+) \/ \1$/.test(layers.trim()) || layers.trim() === '1 / 1') fail(`GPTQ progress should count the layers: ${layers}`);
  const gptqCfg = JSON.parse(readFileSync(join(work, 'saves', 'e2e_gptq', 'config.json'), 'utf8'));
  if (gptqCfg.quantization_config?.quant_method !== 'gptq' || gptqCfg.quantization_config.bits !== 4) fail(`GPTQ config: ${JSON.stringify(gptqCfg.quantization_config)}`);
  await page.selectOption('#f-export-export_quantization_bit', 'none');
  console.log(`gptq export ok (${layers.trim()} layers)`);

  // Image chat with the demo vision-language model (a tiny Qwen2-VL built beside the demo model).
  await page.fill('#f-top-model_name_or_path', 'models/demo-vl');
  await page.press('#f-top-model_name_or_path', 'Tab');
  await page.waitForFunction(() => document.querySelector('#f-template').value === 'qwen2_vl', null, { timeout: 30000 });
  await page.click('[data-tab="tab_chat"]');
  await page.click('[data-testid="chat-load"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="chat-status"]').textContent.includes('demo-vl'), null, { timeout: 60000 });
  await page.click('[data-testid="chat-clear"]');
  await page.setInputFiles('[data-testid="chat-image"]', join(repo, 'tests/fixtures/vision/small.png'));
  await page.waitForSelector('[data-testid="chat-image-thumb"] img');
  await page.fill('[data-testid="chat-input"]', 'What is in this picture?');
  const before = tokenFrames;
  await page.click('[data-testid="chat-submit"]');
  await page.waitForFunction(() => {
    const b = document.querySelectorAll('[data-testid="chat-log"] .bubble.assistant');
    return b.length === 1 && b[0].textContent.length > 0 && !document.querySelector('[data-testid="chat-submit"]').disabled;
  }, null, { timeout: 60000 });
  if (await page.$('[data-testid="chat-error"]')) fail(`image chat: ${await page.textContent('[data-testid="chat-error"]')}`);
  if (!(await page.$('[data-testid="chat-log"] .bubble.user img'))) fail('the image is not shown with the message it was sent with');
  if (tokenFrames - before < 2) fail(`the image chat reply was not streamed (${tokenFrames - before} token frames)`);
  console.log(`image chat reply streamed in ${tokenFrames - before} frames`);
  await page.screenshot({ path: join(shots, 'chat-image.png'), fullPage: true });

  // A phone-width screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.click('[data-tab="tab_train"]');
  await page.screenshot({ path: join(shots, 'train-phone.png'), fullPage: true });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 4) fail(`the page is ${overflow}px wider than a phone screen`);

  if (errors.length) fail(`console errors: ${errors.join(' | ')}`);
  console.log(`1 passed, 0 failed (screenshots in ${shots})`);
} catch (e) {
  if (!process.exitCode) { console.error(e); process.exitCode = 1; }
} finally {
  await browser.close();
  srv.kill('SIGTERM');
}
