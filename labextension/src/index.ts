/**
 * JupyterLab extension for Shared GPU kernels: a status bar item (state, queue position, host
 * and slot, time until idle suspend, quota) for the current notebook's kernel, and a panel
 * (click the item) with what %gpu shows and a "Suspend now" button.
 *
 * Data comes from the Jupyter server extension in the same package
 * (provisioner/server_extension.py): GET shared-gpu/kernels/<id>, POST .../suspend. The broker's
 * token never reaches the browser.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { URLExt } from '@jupyterlab/coreutils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar, Popup, showPopup } from '@jupyterlab/statusbar';
import { Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { IUiState, isTransient, panelLines, statusText } from './format';

const PROVISIONER = 'shared-gpu-provisioner';
const POLL_MS = 2000;
const FAST_POLL_MS = 700;

/** GET or POST one of the server extension's routes; null on 404 (not a Shared GPU kernel). */
async function call(path: string, method = 'GET'): Promise<IUiState | null> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'shared-gpu', 'kernels', path);
  const response = await ServerConnection.makeRequest(url, { method }, settings);
  if (response.status === 404) {
    return null;
  }
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response);
  }
  return (await response.json()) as IUiState;
}

/** The panel the item opens: %gpu's lines and a "Suspend now" button. */
class StatusPanel extends Widget {
  constructor(private _suspend: () => void) {
    super();
    this.addClass('jp-SharedGPU-panel');
    this._table = document.createElement('table');
    this._button = document.createElement('button');
    this._button.className = 'jp-SharedGPU-suspend jp-mod-styled jp-mod-accept';
    this._button.textContent = 'Suspend now';
    this._button.title = 'Save the kernel\'s variables and give its GPU back; the next cell resumes it';
    this._button.addEventListener('click', () => this._suspend());
    const title = document.createElement('div');
    title.className = 'jp-SharedGPU-title';
    title.textContent = 'Shared GPU kernel';
    this.node.append(title, this._table, this._button);
  }

  render(state: IUiState): void {
    this._table.replaceChildren(
      ...panelLines(state, Date.now() / 1000).map(([label, value]) => {
        const row = document.createElement('tr');
        const th = document.createElement('th');
        const td = document.createElement('td');
        th.textContent = label;
        td.textContent = value;
        row.append(th, td);
        return row;
      })
    );
    this._button.disabled = state.state !== 'running' || state.busy;
  }

  private _table: HTMLTableElement;
  private _button: HTMLButtonElement;
}

/** The status bar item; shown while the current notebook's kernel is a Shared GPU kernel. */
class SharedGPUStatus extends Widget {
  readonly activeChanged = new Signal<this, void>(this);

  constructor(private _app: JupyterFrontEnd, private _tracker: INotebookTracker) {
    super();
    this.addClass('jp-SharedGPU-status');
    this.node.title = 'Shared GPU kernel: click for details';
    this.node.addEventListener('click', () => this._openPanel());
    _tracker.currentChanged.connect(this._bind, this);
    this._bind();
    document.addEventListener('visibilitychange', () => this._schedule(0));
  }

  get active(): boolean {
    return this._state !== null;
  }

  private _bind(): void {
    const panel = this._tracker.currentWidget;
    if (panel === this._panel) {
      return;
    }
    if (this._panel) {
      this._panel.sessionContext.kernelChanged.disconnect(this._poke, this);
      this._panel.sessionContext.statusChanged.disconnect(this._poke, this);
    }
    this._panel = panel;
    if (panel) {
      panel.sessionContext.kernelChanged.connect(this._poke, this);
      panel.sessionContext.statusChanged.connect(this._poke, this);
    }
    this._show(null);
    this._schedule(0);
  }

  private _poke(): void {
    this._schedule(100);
  }

  private _kernel(): { id: string; name: string } | null {
    const kernel = this._panel?.sessionContext.session?.kernel;
    return kernel ? { id: kernel.id, name: kernel.name } : null;
  }

  private _isSharedSpec(name: string): boolean {
    const spec = this._app.serviceManager.kernelspecs.specs?.kernelspecs[name];
    const provisioner = (spec?.metadata as any)?.kernel_provisioner;
    return provisioner?.provisioner_name === PROVISIONER;
  }

  private _schedule(delay: number): void {
    window.clearTimeout(this._timer);
    this._timer = window.setTimeout(() => void this._refresh(), delay);
  }

  private async _refresh(): Promise<void> {
    const kernel = this._kernel();
    let next = POLL_MS;
    if (!kernel || document.hidden) {
      this._show(null);
      if (kernel) {
        this._schedule(next);
      }
      return;
    }
    try {
      const state = await call(encodeURIComponent(kernel.id));
      if (this._kernel()?.id !== kernel.id) {
        return; // the notebook moved on meanwhile; its own refresh is scheduled
      }
      if (state === null && !this._isSharedSpec(kernel.name)) {
        this._show(null);
        next = POLL_MS * 5; // another kind of kernel: check rarely (it may be restarted as ours)
      } else {
        this._show(state);
        next = isTransient(state) ? FAST_POLL_MS : POLL_MS;
      }
    } catch (err) {
      console.warn('Shared GPU status:', err);
      next = POLL_MS * 3;
    }
    this._schedule(next);
  }

  private _show(state: IUiState | null): void {
    const wasActive = this.active;
    this._state = state;
    this.node.textContent = state ? statusText(state) : '';
    this.node.dataset.state = state ? state.state : '';
    if (state && this._popup && !this._popup.isDisposed) {
      this._details.render(state);
    }
    if (wasActive !== this.active) {
      this.activeChanged.emit();
    }
  }

  private _openPanel(): void {
    if (!this._state) {
      return;
    }
    this._details.render(this._state);
    this._popup = showPopup({ body: this._details, anchor: this, align: 'left' });
  }

  private async _suspendNow(): Promise<void> {
    const kernel = this._kernel();
    if (!kernel) {
      return;
    }
    try {
      this._show(await call(`${encodeURIComponent(kernel.id)}/suspend`, 'POST'));
    } catch (err) {
      console.warn('Shared GPU suspend:', err);
    }
    this._schedule(FAST_POLL_MS);
  }

  private _panel: NotebookPanel | null = null;
  private _state: IUiState | null = null;
  private _timer = 0;
  private _popup: Popup | null = null;
  private _details = new StatusPanel(() => void this._suspendNow());
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-shared-gpu:status',
  description: 'Status bar item and panel for Shared GPU kernels',
  autoStart: true,
  requires: [IStatusBar, INotebookTracker],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar, tracker: INotebookTracker) => {
    const item = new SharedGPUStatus(app, tracker);
    statusBar.registerStatusItem('jupyter-shared-gpu:status', {
      item,
      align: 'left',
      rank: 4,
      isActive: () => item.active,
      activeStateChanged: item.activeChanged
    });
  }
};

export default plugin;
