"""Render SACDiff.ui outside Slicer with PySide6 stand-ins for the CTK / qMRML widgets (a mock-up, not Slicer).

Run from the repository root: python Resources/results/render_panel_mockup.py "<threshold text>" "<volume text>"
"""
import os, sys
os.environ["QT_QPA_PLATFORM"] = "offscreen"
from PySide6.QtCore import QFile, Qt
from PySide6.QtGui import QPainter, QColor, QFont
from PySide6.QtUiTools import QUiLoader
from PySide6.QtWidgets import (QApplication, QComboBox, QGroupBox, QLineEdit, QPushButton, QSlider, QWidget,
                               QHBoxLayout, QDoubleSpinBox, QVBoxLayout, QLabel)

class ctkCollapsibleButton(QGroupBox):
    pass
class qMRMLWidget(QWidget):
    pass
class qMRMLNodeComboBox(QComboBox):
    pass
class ctkPathLineEdit(QLineEdit):
    pass
class ctkDirectoryButton(QPushButton):
    pass
class ctkSliderWidget(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QHBoxLayout(self); lay.setContentsMargins(0, 0, 0, 0)
        self.s = QSlider(Qt.Horizontal); self.s.setRange(-200, 400); self.s.setValue(100)
        self.b = QDoubleSpinBox(); self.b.setRange(-2, 4); self.b.setValue(1.0); self.b.setSingleStep(0.05)
        lay.addWidget(self.s); lay.addWidget(self.b)

app = QApplication([])
loader = QUiLoader()
for c in (ctkCollapsibleButton, qMRMLWidget, qMRMLNodeComboBox, ctkPathLineEdit, ctkDirectoryButton, ctkSliderWidget):
    loader.registerCustomWidget(c)
f = QFile("SACDiff/Resources/UI/SACDiff.ui"); f.open(QFile.ReadOnly)
w = loader.load(f)
w.findChild(QGroupBox, "inputsCollapsibleButton").setTitle("Inputs")
w.findChild(QGroupBox, "settingsCollapsibleButton").setTitle("Detection settings")
w.findChild(QGroupBox, "resultsCollapsibleButton").setTitle("Results")
w.findChild(QComboBox, "inputVolumeSelector").addItem("ctmd_P001 CT")
w.findChild(QComboBox, "lungMaskSelector").addItem("ctmd_P001 lungs (SACDiff)")
for name, items in (("deviceComboBox", ["auto", "cuda", "cpu"]), ("presetComboBox", ["fast", "model", "paper"])):
    w.findChild(QComboBox, name).addItems(items)
w.findChild(QLineEdit, "modelPathLineEdit").setPlaceholderText("(shipped model: sacdiff-small256.pt)")
w.findChild(QPushButton, "exportDirectoryButton").setText("~/SACDiff-exports")
w.findChild(QPushButton, "applyButton").setEnabled(True)
w.findChild(QPushButton, "exportButton").setEnabled(True)
w.findChild(QLabel, "thresholdLabel").setText(sys.argv[1] if len(sys.argv) > 1 else "α = 0.0123 (λ = 1.00)")
w.findChild(QLabel, "volumeLabel").setText(sys.argv[2] if len(sys.argv) > 2 else "example values")
w.findChild(QLabel, "statusLabel").setText("Done.")
from PySide6.QtWidgets import QCheckBox, QSpinBox
w.findChild(QCheckBox, "crfCheckBox").setChecked(True)
w.findChild(QSpinBox, "ensembleSpinBox").setValue(3)
w.findChild(QSpinBox, "samplingStepsSpinBox").setValue(25)
w.resize(420, 640)
w.show(); app.processEvents()
img = w.grab().toImage()
p = QPainter(img); p.setPen(QColor(200, 0, 0)); f2 = QFont(); f2.setPointSize(8); p.setFont(f2)
p.drawText(6, img.height() - 20, "MOCK-UP, not a Slicer screenshot: SACDiff.ui rendered with PySide6")
p.drawText(6, img.height() - 6, "outside Slicer; CTK/MRML widgets replaced by plain Qt stand-ins.")
p.end()
img.save("Resources/results/slicer-panel-mockup.png")
